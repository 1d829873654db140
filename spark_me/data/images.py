"""Unlabelled image datasets: ImageFolder trees, flat folders, and the embedded default photographs.

Unreadable files are skipped and counted (found at indexing time by reading each file's header;
a file that only fails to decode later is replaced by the next good one, with a warning). Any mode
(grayscale, RGBA, CMYK, palette, 16-bit) is converted to RGB.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}

# Real photographs that scikit-image ships inside its wheel (public domain / CC0, see its README).
SAMPLE_PHOTOS = (
    "astronaut.png",
    "brick.png",
    "camera.png",
    "chelsea.png",
    "clock_motion.png",
    "coffee.png",
    "coins.png",
    "grass.png",
    "gravel.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "moon.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "retina.jpg",
    "rocket.jpg",
)


# Held out of pretraining on the embedded set, for its validation loss: two colour and two grayscale
# photographs whose scenes have no near twin among the others (motorcycle_right would have one).
HELD_OUT_PHOTOS = ("chelsea.png", "coins.png", "gravel.png", "rocket.jpg")
TRAIN_PHOTOS = tuple(name for name in SAMPLE_PHOTOS if name not in HELD_OUT_PHOTOS)


def sample_photo_paths(names: Sequence[str] = SAMPLE_PHOTOS) -> list[Path]:
    """Paths of embedded photographs (300-800 px, RGB and grayscale); all 16 by default."""
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    paths = [folder / name for name in names if (folder / name).is_file()]
    if not paths:
        raise FileNotFoundError(f"scikit-image's sample photographs are missing from {folder}")
    return paths


def load_rgb(path: Path) -> Image.Image:
    """Any image file -> RGB PIL image (16-bit and float images are rescaled to 8 bit)."""
    with Image.open(path) as img:
        img.load()
        if img.mode in ("I;16", "I;16B", "I", "F"):
            img = (
                img.point(lambda v: v / 256).convert("L") if img.mode.startswith("I;16") else img.convert("L")
            )
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            background = Image.new("RGB", img.size, (255, 255, 255))
            background.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
            return background
        return img.convert("RGB")


def _readable(path: Path) -> bool:
    try:
        with Image.open(path) as img:
            img.verify()
        return True
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError):
        return False


class ImageFiles(Dataset):
    """Every image under `root` (recursively: flat folders and ImageFolder class trees alike).

    `root=None` uses the embedded photographs less the held-out ones; a sequence of paths uses
    exactly those files. Items are transformed images only (no labels). `keep_decoded` holds each
    decoded image in memory after its first use (for a handful of photographs, where decoding would
    otherwise cost a fifth of a small model's step).
    """

    def __init__(
        self,
        root: str | Path | Sequence[Path] | None = None,
        transform: Callable | None = None,
        keep_decoded: bool = False,
    ):
        if root is None:
            root = sample_photo_paths(TRAIN_PHOTOS)
        if not isinstance(root, str | Path):
            candidates = [Path(p) for p in root]
            self.root = candidates[0].parent if candidates else Path()
        else:
            self.root = Path(root)
            if not self.root.is_dir():
                raise FileNotFoundError(f"data path {self.root} is not a folder")
            candidates = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        self.transform = transform
        self.decoded: dict[Path, Image.Image] | None = {} if keep_decoded else None
        self.files = [p for p in candidates if _readable(p)]
        self.skipped = [p for p in candidates if p not in set(self.files)]
        if self.skipped:
            log.warning(
                "skipped %d unreadable image file(s) under %s, e.g. %s",
                len(self.skipped),
                self.root,
                ", ".join(str(p) for p in self.skipped[:3]),
            )
        if not self.files:
            raise ValueError(
                f"no readable images under {self.root} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})"
            )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        for attempt in range(len(self.files)):
            path = self.files[(index + attempt) % len(self.files)]
            image = self.decoded.get(path) if self.decoded is not None else None
            try:
                if image is None:
                    image = load_rgb(path)
            except (OSError, UnidentifiedImageError, ValueError) as err:
                log.warning("cannot decode %s (%s); using the next image", path, err)
                continue
            if self.decoded is not None:
                self.decoded[path] = image
            return self.transform(image) if self.transform else image
        raise RuntimeError(f"no image under {self.root} can be decoded")
