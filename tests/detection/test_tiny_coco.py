"""The synthetic smoke set is valid COCO: pycocotools reads it, boxes and masks agree."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from detection.tiny_coco import make_tiny_coco


def test_boxes_match_masks_and_are_deterministic(tmp_path: Path) -> None:
    splits = make_tiny_coco(tmp_path / "a", num_train=3, num_val=2)
    again = make_tiny_coco(tmp_path / "b", num_train=3, num_val=2)
    assert splits["train"][0].read_text() == again["train"][0].read_text()
    for split, (json_file, image_dir) in splits.items():
        coco = COCO(str(json_file))
        assert len(coco.getImgIds()) == (3 if split == "train" else 2)
        assert sorted(c["name"] for c in coco.loadCats(coco.getCatIds())) == ["disc", "square"]
        for ann in coco.loadAnns(coco.getAnnIds()):
            image = coco.loadImgs(ann["image_id"])[0]
            assert (image_dir / image["file_name"]).is_file()
            rle = mask_utils.frPyObjects(ann["segmentation"], image["height"], image["width"])
            area = float(mask_utils.area(mask_utils.merge(rle)))
            assert abs(area - ann["area"]) <= 0.1 * ann["area"] + 2
            x, y, w, h = ann["bbox"]
            assert x >= 0 and y >= 0 and w > 0 and h > 0
            assert x + w <= image["width"] and y + h <= image["height"]
            m = mask_utils.decode(mask_utils.merge(rle))
            ys, xs = np.nonzero(m)
            assert abs(xs.min() - x) <= 1.5 and abs(ys.min() - y) <= 1.5
