"""A tiny COCO-format instance-segmentation set for smoke runs: real photographs with painted shapes.

Each image is one of the embedded photographs (resized) with 1-3 flat-coloured squares and discs
painted on it; boxes and polygon masks are exact. Two categories, deterministic for a given seed.

    python -m detection.tiny_coco OUT_DIR   # -> OUT_DIR/{train,val}.json, OUT_DIR/images/
"""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

from spark_me.data.images import load_rgb, sample_photo_paths

CATEGORIES = [
    {"id": 1, "name": "square", "supercategory": "shape"},
    {"id": 2, "name": "disc", "supercategory": "shape"},
]


def _shape(rng: random.Random, width: int, height: int) -> tuple[int, list[float]]:
    """A random category and its polygon (flat [x0, y0, x1, y1, ...]) inside the image."""
    size = rng.randint(min(width, height) // 6, min(width, height) // 3)
    x0, y0 = rng.randint(0, width - size - 1), rng.randint(0, height - size - 1)
    if rng.random() < 0.5:
        return 1, [x0, y0, x0 + size, y0, x0 + size, y0 + size, x0, y0 + size]
    cx, cy, r = x0 + size / 2, y0 + size / 2, size / 2
    points = [
        (cx + r * math.cos(2 * math.pi * k / 24), cy + r * math.sin(2 * math.pi * k / 24)) for k in range(24)
    ]
    return 2, [round(c, 2) for p in points for c in p]


def make_tiny_coco(
    out: str | Path, num_train: int = 4, num_val: int = 2, size: tuple[int, int] = (160, 128), seed: int = 0
) -> dict[str, tuple[Path, Path]]:
    """Write the set; returns {"train": (json, image_dir), "val": (json, image_dir)}."""
    out, rng = Path(out), random.Random(seed)
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    photos = sample_photo_paths()
    width, height = size
    splits, ann_id, image_id = {}, 1, 1
    for split, count in (("train", num_train), ("val", num_val)):
        images, annotations = [], []
        for _ in range(count):
            photo = load_rgb(photos[(image_id - 1) % len(photos)]).resize((width, height), Image.BILINEAR)
            draw = ImageDraw.Draw(photo)
            for _ in range(rng.randint(1, 3)):
                category, poly = _shape(rng, width, height)
                draw.polygon(poly, fill=tuple(rng.randint(0, 255) for _ in range(3)))
                xs, ys = poly[0::2], poly[1::2]
                box = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
                area = 0.5 * abs(sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(len(xs))))
                annotations.append(
                    {"id": ann_id, "image_id": image_id, "category_id": category, "bbox": box, "area": area,
                     "segmentation": [poly], "iscrowd": 0}
                )  # fmt: skip
                ann_id += 1
            name = f"{split}_{image_id:03d}.jpg"
            photo.save(image_dir / name, quality=95)
            images.append({"id": image_id, "file_name": name, "width": width, "height": height})
            image_id += 1
        json_file = out / f"{split}.json"
        json_file.write_text(
            json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES})
        )
        splits[split] = (json_file, image_dir)
    return splits


if __name__ == "__main__":
    for split, (json_file, images) in make_tiny_coco(
        sys.argv[1] if len(sys.argv) > 1 else "tiny_coco"
    ).items():
        print(f"{split}: {json_file} ({images})")
