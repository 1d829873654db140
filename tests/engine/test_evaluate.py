"""The validation loss: held-out images, centre crops, fixed masks, logged beside the train loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from spark_me import cli
from spark_me.data.images import HELD_OUT_PHOTOS, SAMPLE_PHOTOS, ImageFiles
from spark_me.engine.config import resolve
from spark_me.engine.evaluate import Validation
from spark_me.engine.pretrain import build_model

from .conftest import TINY_RUN


def test_embedded_set_holds_photographs_out_of_training() -> None:
    train = {p.name for p in ImageFiles(None).files}
    validation = Validation.from_config(resolve(TINY_RUN))
    assert validation is not None
    held_out = {p.name for p in validation.loader.dataset.files}
    assert held_out == set(HELD_OUT_PHOTOS) and not train & held_out
    assert train | held_out == set(SAMPLE_PHOTOS)


def test_where_the_validation_images_come_from(tmp_path: Path) -> None:
    for i in range(3):
        Image.new("RGB", (90, 80), (40 * i, 20, 200)).save(tmp_path / f"{i}.png")
    chosen = Validation.from_config(resolve([*TINY_RUN, "--val_path", str(tmp_path)]))
    assert chosen is not None and len(chosen.loader.dataset) == 3 and chosen.masks.shape == (3, 2, 2)
    assert Validation.from_config(resolve([*TINY_RUN, "--val_every", "0"])) is None
    assert Validation.from_config(resolve(["--data_path", str(tmp_path), "--batch_size", "2"])) is None
    with pytest.raises(FileNotFoundError, match="not a folder"):
        Validation.from_config(resolve([*TINY_RUN, "--val_path", str(tmp_path / "absent")]))


def test_masks_are_fixed_by_the_seed() -> None:
    a, b = (Validation.from_config(resolve([*TINY_RUN, "--input_size", "128"])) for _ in range(2))
    other = Validation.from_config(resolve([*TINY_RUN, "--input_size", "128", "--seed", "1"]))
    assert torch.equal(a.masks, b.masks) and not torch.equal(a.masks, other.masks)
    assert (a.masks.flatten(1).sum(1) == round(16 * 0.4)).all()  # SparK's keep count per image


def test_loss_is_the_masked_patch_loss_over_all_images() -> None:
    """Batches of 3 + 1 give the loss of all 4 images at once; the model's mode is restored."""
    cfg = resolve([*TINY_RUN, "--batch_size", "3"])
    validation = Validation.from_config(cfg)
    model = build_model(cfg).train()
    value = validation.loss(model)
    assert model.training
    assert validation.loss(model) == value  # fixed crops and masks: the same number twice
    images = torch.stack([validation.loader.dataset[i] for i in range(4)])
    with torch.no_grad():
        expected = float(model.eval().forward_all(images, validation.masks).loss)
    assert value == pytest.approx(expected, rel=1e-5)
    assert 0.3 < value < 3.0  # an untrained model predicts roughly the patch mean: about 1


def test_due_every_n_epochs_and_at_the_end() -> None:
    validation = Validation.from_config(resolve([*TINY_RUN, "--val_every", "2", "--epochs", "5"]))
    assert [e + 1 for e in range(5) if validation.due(e)] == [2, 4, 5]


def test_run_logs_validation_beside_training(tmp_path: Path) -> None:
    args = ["pretrain", "--output_dir", str(tmp_path), *TINY_RUN, "--epochs", "3", "--val_every", "2"]
    assert cli.main(args) == 0
    records = [json.loads(line) for line in (tmp_path / "log.txt").read_text().splitlines()]
    assert ["val_loss" in r for r in records] == [False, True, True]
    assert all(0.0 < r["val_loss"] < 3.0 for r in records if "val_loss" in r)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = {p.name: p for p in (tmp_path / "tb").iterdir() if p.is_dir()}
    assert {"epoch_loss_train", "epoch_loss_val"} <= runs.keys()
    events = EventAccumulator(str(runs["epoch_loss_val"])).Reload()
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars("epoch/loss")] == [
        (r["epoch"], r["val_loss"]) for r in records if "val_loss" in r
    ]
