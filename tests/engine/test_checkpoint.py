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
    assert checkpoint.find_resumable(tmp_path).path == tmp_path / "checkpoint-0010.pth"
    write(tmp_path / "checkpoint-last.pth", 16)
    assert checkpoint.find_resumable(tmp_path).path == tmp_path / "checkpoint-last.pth"
    write(tmp_path / checkpoint.MID_EPOCH, 18)  # a mid-epoch state after the last epoch end
    assert checkpoint.find_resumable(tmp_path).path == tmp_path / checkpoint.MID_EPOCH


def test_damaged_newest_is_skipped_for_the_next_one(tmp_path: Path) -> None:
    write(tmp_path / "checkpoint-0001.pth", 4)
    write(tmp_path / "checkpoint-0002.pth", 8)
    last = write(tmp_path / "checkpoint-last.pth", 12)
    last.write_bytes(last.read_bytes()[:100])  # truncated mid-write by a crash
    found = checkpoint.find_resumable(tmp_path)
    assert found.path == tmp_path / "checkpoint-0002.pth"
    ((path, why),) = found.skipped
    assert path == last and "truncated" in why and str(path) not in why
    (tmp_path / "checkpoint-0002.pth").write_bytes(b"garbage")
    found = checkpoint.find_resumable(tmp_path)
    assert found.path == tmp_path / "checkpoint-0001.pth" and len(found.skipped) == 2


def test_none_readable_stops_with_the_ways_out_and_changes_nothing(tmp_path: Path) -> None:
    last = write(tmp_path / "checkpoint-last.pth", 12)
    last.write_bytes(last.read_bytes()[:100])
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "checkpoint-0003.pth")  # not a full state
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(checkpoint.NoReadableCheckpoint) as err:
        checkpoint.find_resumable(tmp_path)
    message = str(err.value)
    assert "\n" not in message
    for needed in ("checkpoint-last.pth: ", "checkpoint-0003.pth: ", "truncated", "missing model",
                   "--resume FILE", "--no_auto_resume", "move them"):  # fmt: skip
        assert needed in message, needed
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_set_aside_keeps_every_copy(tmp_path: Path) -> None:
    for n in range(3):
        (tmp_path / "checkpoint-last.pth").write_text(str(n))
        kept = checkpoint.set_aside(tmp_path / "checkpoint-last.pth")
        assert kept.read_text() == str(n) and not (tmp_path / "checkpoint-last.pth").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-last.pth.unreadable",
        "checkpoint-last.pth.unreadable-2",
        "checkpoint-last.pth.unreadable-3",
    ]


def test_nothing_to_resume(tmp_path: Path) -> None:
    assert checkpoint.find_resumable(tmp_path).path is None
    (tmp_path / "other.pth").write_bytes(b"")  # not a checkpoint name: not a candidate
    assert checkpoint.find_resumable(tmp_path).path is None


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
