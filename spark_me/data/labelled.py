"""Labelled images for fine-tuning and probes: DIR/train and DIR/val ImageFolder trees.

The layout is checked before anything trains, each problem in one line: a missing split, class
folders that differ between the splits, fewer than two classes, a class folder without a readable
image. Files are read with the pretraining reader (`ImageFiles`, one per class folder): unreadable
files are skipped and counted, any image mode becomes RGB, and a file that fails to decode later is
replaced by another image *of the same class*, so a label never changes.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from spark_me.data.images import ImageFiles

log = logging.getLogger(__name__)

SPLITS = ("train", "val")


@dataclass(frozen=True)
class Splits:
    root: Path
    classes: tuple[str, ...]  # sorted class folder names; label i is classes[i]

    def folder(self, split: str) -> Path:
        return self.root / split


def class_folders(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def find_splits(data_path: str | Path) -> Splits:
    """The class names of DIR/train and DIR/val, after checking that the two trees agree."""
    root = Path(data_path)
    if not root.is_dir():
        raise FileNotFoundError(f"data path {root} is not a folder")
    missing = [s for s in SPLITS if not (root / s).is_dir()]
    if missing:
        raise ValueError(
            f"{root} has no {' and no '.join(m + '/' for m in missing)} folder: expected "
            f"{root}/train/<class>/<images> and {root}/val/<class>/<images>"
        )
    train, val = (class_folders(root / s) for s in SPLITS)
    if train != val:
        only_train, only_val = sorted(set(train) - set(val)), sorted(set(val) - set(train))
        parts = [f"only in train/: {', '.join(only_train)}"] if only_train else []
        parts += [f"only in val/: {', '.join(only_val)}"] if only_val else []
        raise ValueError(f"the class folders of {root}/train and {root}/val differ ({'; '.join(parts)})")
    if len(train) < 2:
        raise ValueError(
            f"{root}/train has {len(train)} class folder(s){' (' + train[0] + ')' if train else ''}: "
            "classification needs at least 2 (one sub-folder of images per class)"
        )
    return Splits(root, tuple(train))


class LabelledImages(Dataset):
    """(transformed image, class index) pairs of one split; classes in `splits.classes` order."""

    def __init__(self, splits: Splits, split: str, transform: Callable[[Image.Image], object] | None):
        folder = splits.folder(split)
        self.per_class = [ImageFiles(folder / name, transform) for name in splits.classes]
        self.ends = []
        total = 0
        for files in self.per_class:
            total += len(files)
            self.ends.append(total)
        self.skipped = sum(len(files.skipped) for files in self.per_class)
        log.info(
            "%s: %d images in %d classes%s",
            folder,
            total,
            len(splits.classes),
            f" ({self.skipped} unreadable file(s) skipped)" if self.skipped else "",
        )

    def __len__(self) -> int:
        return self.ends[-1]

    @property
    def targets(self) -> list[int]:
        return [label for label, files in enumerate(self.per_class) for _ in range(len(files))]

    def __getitem__(self, index: int) -> tuple[object, int]:
        label = bisect.bisect_right(self.ends, index)
        start = self.ends[label - 1] if label else 0
        return self.per_class[label][index - start], label
