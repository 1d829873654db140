"""`spark-me finetune` end to end on the CPU: it learns (and cannot with uninformative labels), the
exports load strictly in timm, `--eval` reproduces the logged accuracy, a killed run resumes exactly.

The data: tests/_labelled.py (4 colour classes drawn with numpy, 160 training / 80 validation
images). The runs use SparK's ResNet recipe as is (LAMB, layer decay 0.7, RandAugment, Mixup +
CutMix, label smoothing, EMA) except for a larger lr: 40 updates from scratch, not 300 epochs.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from spark_me import cli
from spark_me.engine import finetune
from tests._labelled import make_labelled_set

FAST = [
    "--arch",
    "resnet18",
    "--input_size",
    "32",
    "--batch_size",
    "16",
    "--num_workers",
    "0",
    "--blr",
    "0.4",
]
CHANCE = 25.0  # 4 balanced classes


def run(data: Path, out: Path, *extra: str) -> int:
    return cli.main(["finetune", "--data_path", str(data), "--output_dir", str(out), *FAST, *extra])


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(data, output) of one 4-epoch run on the labelled set (2 unreadable files among it)."""
    root = tmp_path_factory.mktemp("finetune")
    data = make_labelled_set(root / "data", unreadable=2)
    assert run(data, root / "out", "--epochs", "4") == 0
    return data, root / "out"


def test_learns_the_classes_and_logs_each_epoch(trained) -> None:
    _, out = trained
    log = read_log(out)
    assert [r["epoch"] for r in log] == [1, 2, 3, 4] and [r["step"] for r in log] == [10, 20, 30, 40]
    for record in log:
        assert {"train_loss", "lr", "val_loss", "val_top1", "val_top5", "ema_val_top1"} <= record.keys()
    # chance: 25%; measured 82.5-93.75% (EMA 77.5-88.75%) over data and run seeds 0-2
    assert log[-1]["val_top1"] >= 75.0 and log[-1]["ema_val_top1"] >= 65.0
    assert log[-1]["val_loss"] < log[0]["val_loss"]
    assert log[-1]["best_top1"] == max(max(r["val_top1"], r["ema_val_top1"]) for r in log)
    assert any((out / "tb").iterdir()) and (out / "config.yaml").is_file()


def test_uninformative_labels_stay_at_chance(tmp_path: Path) -> None:
    """The same run with each colour spread evenly over the four training folders: nothing to learn,
    so validation top-1 stays near 25% (a leak of val labels, or of the file order, would show).
    Predictions are alike within a colour, so the 80 images vary like a few independent draws:
    the bounds are wide (measured: at most 41.25%, epoch means 28.75-33.1% over seeds 0 and 3),
    and still far below the informative run's >= 75%."""
    data = make_labelled_set(tmp_path / "data", shuffle_train_labels=True)
    assert run(data, tmp_path / "out", "--epochs", "4") == 0
    top1 = [r["val_top1"] for r in read_log(tmp_path / "out")]
    assert max(top1) <= 50.0 and abs(sum(top1) / len(top1) - CHANCE) <= 12.5, top1


def test_exports_load_strictly_in_timm_and_eval_reproduces_the_log(trained, caplog) -> None:
    data, out = trained
    log = read_log(out)
    for name in ("timm-best.pth", "timm-last.pth"):
        model = timm.create_model("resnet18", num_classes=4)
        model.load_state_dict(torch.load(out / name, weights_only=True), strict=True)
    caplog.set_level(logging.INFO)
    args = ["finetune", "--data_path", str(data), *FAST, "--eval", "--weights", str(out / "timm-last.pth")]
    assert cli.main(args) == 0
    line = next(
        r.getMessage() for r in caplog.records if "top-1" in r.getMessage() and "timm-last" in r.getMessage()
    )
    assert f"top-1 {log[-1]['val_top1']:.2f}%" in line and f"top-5 {log[-1]['val_top5']:.2f}%" in line


def test_resume_after_kill_equals_an_uninterrupted_run(tmp_path: Path, monkeypatch) -> None:
    """Killed during epoch 2, the same command resumes from the end of epoch 1 and ends with the
    uninterrupted run's weights, EMA weights, optimiser steps, lr and accuracies (bit for bit:
    every random choice of an epoch is seeded by the epoch)."""
    data = make_labelled_set(tmp_path / "data", train_per_class=16, val_per_class=8)
    args = ["--epochs", "2", "--accum_iter", "2"]  # 64 images: 4 batches, 2 updates an epoch
    assert run(data, tmp_path / "straight", *args) == 0
    original = finetune.train_one_epoch

    def dying(state, epoch: int, step: int, *position):
        if epoch == 1:
            raise SystemExit(9)  # killed during the second epoch
        return original(state, epoch, step, *position)

    monkeypatch.setattr(finetune, "train_one_epoch", dying)
    with pytest.raises(SystemExit):
        run(data, tmp_path / "killed", *args)
    monkeypatch.setattr(finetune, "train_one_epoch", original)
    after_first = torch.load(tmp_path / "killed" / "checkpoint-last.pth", weights_only=True)
    assert after_first["epoch"] == 0
    assert run(data, tmp_path / "killed", *args) == 0
    a, b = read_log(tmp_path / "straight"), read_log(tmp_path / "killed")
    assert [r["step"] for r in b] == [2, 4]
    for key in ("step", "lr", "train_loss", "val_loss", "val_top1", "ema_val_top1"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    want = torch.load(tmp_path / "straight" / "checkpoint-last.pth", weights_only=True)
    got = torch.load(tmp_path / "killed" / "checkpoint-last.pth", weights_only=True)
    for part in ("model", "ema"):
        assert want[part].keys() == got[part].keys()
        for key, value in want[part].items():
            assert torch.equal(value, got[part][key]), (part, key)
        # the second epoch moved every weight, so equality above is not the first epoch's state twice
        assert not torch.equal(want[part]["fc.weight"], after_first[part]["fc.weight"])


def _tiny_set(root: Path) -> Path:
    return make_labelled_set(root, train_per_class=4, val_per_class=2, size=16)


def _no_val(root: Path) -> Path:
    data = _tiny_set(root)
    for path in sorted((data / "val").rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    (data / "val").rmdir()
    return data


def _classes_differ(root: Path) -> Path:
    data = _tiny_set(root)
    (data / "val" / "red").rename(data / "val" / "purple")
    return data


def _one_class(root: Path) -> Path:
    data = _tiny_set(root)
    for split in ("train", "val"):
        for name in ("blue", "green", "yellow"):
            for path in (data / split / name).iterdir():
                path.unlink()
            (data / split / name).rmdir()
    return data


def _unreadable_class(root: Path) -> Path:
    data = _tiny_set(root)
    for path in (data / "val" / "green").iterdir():
        path.write_bytes(b"not an image")
    return data


def _timm_weights(root: Path) -> Path:
    """Plain timm weights of a ResNet-34 (the fine-tuning below asks for a ResNet-18)."""
    torch.save(timm.create_model("resnet34").state_dict(), root / "resnet34.pth")
    return root / "resnet34.pth"


def _pretrained_resnet50(root: Path) -> Path:
    """A pretraining checkpoint's layout (encoder.* keys, config) made for resnet50."""
    state = {f"encoder.{k}": v for k, v in timm.create_model("resnet50", num_classes=0).state_dict().items()}
    checkpoint = {"model": state, "epoch": 3, "step": 9, "config": {"arch": "resnet50", "mask_ratio": 0.6}}
    torch.save(checkpoint, root / "checkpoint-last.pth")
    return root / "checkpoint-last.pth"


BAD_INPUTS = {
    "no val/": (_no_val, None, "has no val/ folder"),
    "class folders differ": (_classes_differ, None, "only in train/: red; only in val/: purple"),
    "a single class": (_one_class, None, "has 1 class folder(s) (red)"),
    "no readable image": (_unreadable_class, None, "no readable images under"),
    "weights of another arch": (_tiny_set, _timm_weights, "does not fit --arch resnet18"),
    "pretrained as another arch": (
        _tiny_set,
        _pretrained_resnet50,
        "was trained as resnet50, not --arch resnet18",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_before_anything_trains(case: str, tmp_path: Path, caplog) -> None:
    make_data, make_weights, expected = BAD_INPUTS[case]
    data = make_data(tmp_path / "data")
    extra = ["--weights", str(make_weights(tmp_path))] if make_weights else []
    out = tmp_path / "out"
    out.mkdir()
    (out / "log.txt").write_text("an earlier run\n")  # must survive untouched
    caplog.set_level(logging.INFO)
    assert run(data, out, "--epochs", "1", *extra) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0] and expected in errors[0], errors
    assert sorted(p.name for p in out.iterdir()) == ["log.txt"]
    assert (out / "log.txt").read_text() == "an earlier run\n"
    assert not any("epoch 1/1" in r.getMessage() for r in caplog.records)


def test_missing_data_path_and_bad_values_are_one_line(caplog) -> None:
    assert cli.main(["finetune", "--arch", "resnet18"]) == 1
    assert cli.main(["finetune", "--data_path", "x", "--smoothing", "1.5", "--batch_size", "7"]) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert "--data_path is required" in errors[0]
    assert "--smoothing 1.5: must be in [0, 1)" in errors[1] and "must be even" in errors[1]
    assert all("\n" not in e for e in errors)


def test_torchrun_two_processes_score_the_saved_model(tmp_path: Path, caplog) -> None:
    """Under torchrun each process scores its share of val/ (19 images: 10 + 9, none twice), with
    rank 0's BatchNorm statistics: the logged loss and top-1 are those of the saved timm-last.pth
    scored by one process."""
    data = make_labelled_set(tmp_path / "data", train_per_class=8, val_per_class=5, size=32)
    next((data / "val" / "red").iterdir()).unlink()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    cmd += ["-m", "spark_me.cli", "finetune", "--data_path", str(data), "--output_dir", str(tmp_path / "out")]
    cmd += [*FAST[:-2], "--batch_size", "8", "--blr", "0.4", "--epochs", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "effective batch 16 (8 per process x 1 accum x 2 processes)" in result.stderr
    (record,) = read_log(tmp_path / "out")  # only rank 0 writes
    assert record["step"] == 2  # 32 images / 16 a step
    caplog.set_level(logging.INFO)
    weights = str(tmp_path / "out" / "timm-last.pth")
    assert cli.main(["finetune", "--data_path", str(data), *FAST, "--eval", "--weights", weights]) == 0
    line = next(r.getMessage() for r in caplog.records if "(19 images)" in r.getMessage())
    assert f"top-1 {record['val_top1']:.2f}%" in line and f"loss {record['val_loss']:.4f}" in line


def test_eval_refuses_weights_without_a_fitting_classifier(tmp_path: Path, caplog) -> None:
    data = _tiny_set(tmp_path / "data")
    state = timm.create_model("resnet18").state_dict()
    weights = tmp_path / "timm-last.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("fc.")}, weights)  # no classifier
    args = ["finetune", "--data_path", str(data), *FAST, "--eval", "--weights", str(weights)]
    assert cli.main(args) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "has no classifier for the 4 classes" in errors[0] and "\n" not in errors[0]
