"""A generated labelled image set (ImageFolder train/ and val/ trees) for fine-tuning and probe tests.

Four classes, each a colour family (red, green, blue, yellow, with jittered hue and brightness)
painted as a random pattern (stripes in either direction, a checkerboard or a disc) over a random
grey background with noise: the class is in the colour, not in the pattern or its position. A
ResNet-18 at 32 px learns it in a few epochs on 2 CPU cores; with the training labels shuffled it
cannot (the tests check both).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("blue", "green", "red", "yellow")
COLOURS = {"blue": (40, 60, 220), "green": (40, 200, 60), "red": (220, 40, 40), "yellow": (220, 210, 40)}


def pattern(size: int, rng: np.random.Generator) -> np.ndarray:
    """A random boolean pattern [size, size]: stripes, checkerboard or disc."""
    y, x = np.mgrid[0:size, 0:size] / size
    freq, phase = rng.uniform(1.5, 3.0), rng.uniform(0, 2 * np.pi)
    kind = rng.integers(4)
    if kind == 0:
        return np.sin(2 * np.pi * freq * y + phase) > 0
    if kind == 1:
        return np.sin(2 * np.pi * freq * x + phase) > 0
    if kind == 2:
        return np.sin(2 * np.pi * freq * x + phase) * np.sin(2 * np.pi * freq * y + phase) > 0
    cy, cx, r = rng.uniform(0.35, 0.65, 2).tolist() + [rng.uniform(0.25, 0.4)]
    return (y - cy) ** 2 + (x - cx) ** 2 < r**2


def draw(label: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One RGB image [size, size, 3] uint8 of class `label`."""
    fg = np.array(COLOURS[label], dtype=float) * rng.uniform(0.7, 1.1) + rng.normal(0, 15, 3)
    bg = np.full(3, rng.uniform(60, 190))
    image = np.where(pattern(size, rng)[..., None], fg, bg) + rng.normal(0, 10, (size, size, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def make_labelled_set(
    root: Path,
    train_per_class: int = 40,
    val_per_class: int = 20,
    size: int = 40,
    seed: int = 0,
    shuffle_train_labels: bool = False,
    unreadable: int = 0,
) -> Path:
    """Write root/train/<class>/*.png and root/val/<class>/*.png; returns root.

    `shuffle_train_labels` files each class's training images evenly and at random under all class
    folders, so the training labels carry no information; `unreadable` adds that many corrupt .png
    files to the first training class."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        labels = [label for label in CLASSES for _ in range(count)]
        folders = list(labels)
        if split == "train" and shuffle_train_labels:
            # each colour's images spread evenly over all class folders: a folder says nothing
            # about the colour, so no classifier can beat chance on val (a plain random
            # permutation would leave per-colour majorities for a model to fit)
            balanced = [CLASSES[i % len(CLASSES)] for i in range(count)]
            folders = [f for _ in CLASSES for f in (balanced[i] for i in rng.permutation(count))]
        for i, (label, folder) in enumerate(zip(labels, folders, strict=True)):
            path = root / split / folder / f"{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(draw(label, size, rng)).save(path)
    for i in range(unreadable):
        (root / "train" / CLASSES[0] / f"broken{i}.png").write_bytes(b"\x89PNG not really")
    return root
