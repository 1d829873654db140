"""Which checkpoint --auto_resume picks, and what --resume refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from spark_me.engine import checkpoint


def fake_state(step: int) -> dict:
    return {"model": {"w": torch.full((2,), float(step))}, "optimizer": {}, "epoch": step // 4 - 1,
            "step": step, "config": {"arch": "resnet18"}}  # fmt: skip


def write(path: Path, step: int) -> Path:
    torch.save(fake_state(step), path)
    return path


def test_newest_by_step_not_by_name(tmp_path: Path) -> None:
    write(tmp_path / "checkpoint-last.pth", 8)
    write(tmp_path / "checkpoint-0001.pth", 4)
    write(tmp_path / "checkpoint-0010.pth", 12)  # numbered 10 > 1 numerically, not as text
    assert checkpoint.latest(tmp_path) == tmp_path / "checkpoint-0010.pth"
    write(tmp_path / "checkpoint-last.pth", 16)
    assert checkpoint.latest(tmp_path) == tmp_path / "checkpoint-last.pth"


def test_damaged_newest_is_skipped_for_the_next_one(tmp_path: Path, caplog) -> None:
    write(tmp_path / "checkpoint-0001.pth", 4)
    write(tmp_path / "checkpoint-0002.pth", 8)
    last = write(tmp_path / "checkpoint-last.pth", 12)
    last.write_bytes(last.read_bytes()[:100])  # truncated mid-write by a crash
    assert checkpoint.latest(tmp_path) == tmp_path / "checkpoint-0002.pth"
    assert "ignoring unreadable checkpoint" in caplog.text and "checkpoint-last.pth" in caplog.text
    (tmp_path / "checkpoint-0002.pth").write_bytes(b"garbage")
    assert checkpoint.latest(tmp_path) == tmp_path / "checkpoint-0001.pth"


def test_nothing_to_resume(tmp_path: Path) -> None:
    assert checkpoint.latest(tmp_path) is None
    (tmp_path / "checkpoint-last.pth").write_bytes(b"")
    assert checkpoint.latest(tmp_path) is None


def test_load_refuses_a_file_that_is_not_a_full_checkpoint(tmp_path: Path) -> None:
    full = write(tmp_path / "full.pth", 4)
    assert checkpoint.load(full)["step"] == 4
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "timm.pth")  # an encoder export
    with pytest.raises(ValueError, match=r"not a full pretraining checkpoint.*--init_weight") as err:
        checkpoint.load(tmp_path / "timm.pth")
    assert "model" in str(err.value) and "step" in str(err.value)
    state = fake_state(4)
    del state["optimizer"]
    torch.save(state, tmp_path / "no_opt.pth")
    with pytest.raises(ValueError, match=r"missing optimizer\)"):
        checkpoint.load(tmp_path / "no_opt.pth")
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        checkpoint.load(tmp_path / "absent.pth")
