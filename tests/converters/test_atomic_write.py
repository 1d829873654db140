"""Weight files are written atomically: a failed save leaves the old file and no debris."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import converters


def fail_half_way(obj, target, *args, **kwargs) -> None:
    """A serialiser that writes a few bytes to its target, then dies (disk full, kill, ...)."""
    if hasattr(target, "write"):
        target.write(b"PK")
        target.flush()
    else:
        Path(target).write_bytes(b"PK")
    raise OSError("no space left on device")


@pytest.mark.parametrize(
    ("suffix", "serialiser"),
    [(".pth", "torch.save"), (".safetensors", "safetensors.torch.save_file"), (".pkl", "pickle.dump")],
)
def test_interrupted_save_keeps_the_old_file(tmp_path: Path, monkeypatch, suffix, serialiser) -> None:
    old = {"w": torch.arange(4.0)}
    path = converters.save_state(old, tmp_path / f"weights{suffix}")
    before = path.read_bytes()
    monkeypatch.setattr(serialiser, fail_half_way)
    with pytest.raises(OSError, match="no space left"):
        converters.save_state({"w": torch.zeros(4)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind
    if suffix != ".pkl":  # (a .pkl is read as a Detectron2 file: the bytes above say enough)
        assert torch.equal(converters.load_state(path)["w"], old["w"])


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_save_then_load(tmp_path: Path, suffix: str) -> None:
    state = {"a.weight": torch.randn(3, 2), "a.bias": torch.randn(3)}
    path = converters.save_state(state, tmp_path / "sub" / f"w{suffix}")  # parent folders are made
    loaded = converters.load_state(path)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
