"""Labelled ImageFolder splits: labels follow the class folders, unreadable files are skipped and
counted, a bad layout is refused in one line (the messages are checked end to end in
tests/engine/test_finetune.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spark_me.data.labelled import LabelledImages, find_splits
from tests._labelled import CLASSES, COLOURS, make_labelled_set


def test_labels_follow_the_class_folders_and_unreadable_files_are_counted(tmp_path: Path) -> None:
    data = make_labelled_set(tmp_path, train_per_class=3, val_per_class=2, size=16, unreadable=2)
    splits = find_splits(data)
    assert splits.classes == CLASSES
    train = LabelledImages(splits, "train", None)
    assert len(train) == 12 and train.skipped == 2 and train.targets == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    files = [
        (label, p) for label, name in enumerate(CLASSES) for p in sorted((data / "train" / name).glob("0*"))
    ]
    assert len(files) == 12
    for index, (want_label, path) in enumerate(files):  # every file once, in order, with its label
        image, label = train[index]
        assert label == want_label and np.array_equal(np.asarray(image), np.asarray(Image.open(path))), index
        # and the label is the painted colour: the most saturated pixels are nearest its colour
        pixels = np.asarray(image, dtype=float).reshape(-1, 3)
        vivid = pixels[np.argsort(pixels.max(1) - pixels.min(1))[-20:]].mean(0)
        nearest = min(COLOURS, key=lambda name: np.linalg.norm(vivid - np.array(COLOURS[name])))
        assert nearest == CLASSES[label], index


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({"train/a": 1, "train/b": 1}, "has no val/ folder"),
        ({"train/a": 1, "train/b": 1, "val/a": 1, "val/c": 1}, "only in train/: b; only in val/: c"),
        ({"train/a": 1, "val/a": 1}, "has 1 class folder(s) (a)"),
    ],
)
def test_bad_layouts(tmp_path: Path, layout: dict[str, int], message: str) -> None:
    for folder in layout:
        (tmp_path / folder).mkdir(parents=True)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        find_splits(tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        find_splits(tmp_path / "nothing")
