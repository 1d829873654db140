"""COCO-format dataset registration from paths.

Detectron2 registers `coco_2017_train/val` at import from `$DETECTRON2_DATASETS` (default `datasets/`):
    $DETECTRON2_DATASETS/coco/{train2017,val2017}/*.jpg
    $DETECTRON2_DATASETS/coco/annotations/instances_{train,val}2017.json
`--coco-root` re-points those two names at another root with the same layout; `--dataset NAME=JSON:IMAGES`
registers any other COCO-format set (e.g. your own, or the tiny smoke set).
"""

from __future__ import annotations

from pathlib import Path

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.data.datasets.builtin_meta import _get_builtin_metadata

COCO_SPLITS = {
    "coco_2017_train": ("coco/train2017", "coco/annotations/instances_train2017.json"),
    "coco_2017_val": ("coco/val2017", "coco/annotations/instances_val2017.json"),
}


def _register(name: str, json_file: Path, image_root: Path, metadata: dict) -> None:
    if not json_file.is_file():
        raise FileNotFoundError(f"dataset {name}: no annotation file {json_file}")
    if not image_root.is_dir():
        raise FileNotFoundError(f"dataset {name}: no image folder {image_root}")
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, metadata, str(json_file), str(image_root))


def register_coco_root(root: str | Path) -> None:
    """Point `coco_2017_train` / `coco_2017_val` at `root` (standard DETECTRON2_DATASETS layout)."""
    root = Path(root)
    for name, (images, json_file) in COCO_SPLITS.items():
        _register(name, root / json_file, root / images, _get_builtin_metadata("coco"))


def register_spec(spec: str) -> str:
    """`NAME=ANNOTATIONS.json:IMAGE_DIR` -> registered dataset NAME (categories from the json)."""
    name, sep, rest = spec.partition("=")
    json_file, sep2, image_root = rest.rpartition(":")
    if not (sep and sep2 and name and json_file and image_root):
        raise ValueError(f"--dataset wants NAME=ANNOTATIONS.json:IMAGE_DIR, got {spec!r}")
    _register(name, Path(json_file), Path(image_root), {})
    return name
