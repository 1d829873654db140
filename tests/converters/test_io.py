"""Reading weight files: anything that is not weights fails with one line naming file and format."""

from __future__ import annotations

import argparse
import pathlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from converters.io import NotACheckpoint, load_state


def an_image(path: Path) -> Path:
    Image.new("RGB", (40, 30), (200, 10, 10)).save(path, format="PNG")
    return path


def truncated(path: Path) -> Path:
    torch.save({"w": torch.randn(64, 64)}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def refused_by_weights_only(path: Path) -> Path:
    """What old training scripts saved: the weights beside an argparse.Namespace."""
    torch.save({"model": {"w": torch.zeros(2)}, "args": argparse.Namespace(lr=0.1)}, path)
    return path


def assert_one_line_error(path: Path, expected: str) -> str:
    with pytest.raises(NotACheckpoint) as exc:
        load_state(path)
    message = str(exc.value)
    assert "\n" not in message
    assert str(path) in message and expected in message
    return message


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (an_image, "it is a PNG image"),
        (truncated, "it is truncated or damaged"),
        (
            refused_by_weights_only,
            "weights_only=True) refused it (Unsupported global: GLOBAL argparse.Namespace",
        ),
    ],
)
@pytest.mark.parametrize("suffix", [".pth", ".pt"])
def test_torch_files_that_are_not_weights(tmp_path: Path, make, why: str, suffix: str) -> None:
    message = assert_one_line_error(make(tmp_path / f"bad{suffix}"), "torch checkpoint or state_dict")
    assert why in message


def test_legacy_pickle_cut_short(tmp_path: Path) -> None:
    path = tmp_path / "old.pth"
    torch.save({"w": torch.zeros(3)}, path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:20])
    assert "truncated or damaged" in assert_one_line_error(path, "torch checkpoint")


def test_safetensors_that_is_an_image(tmp_path: Path) -> None:
    assert_one_line_error(an_image(tmp_path / "bad.safetensors"), "safetensors")


def test_pkl_holding_more_than_numpy_arrays_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.pkl"
    path.write_bytes(pickle.dumps({"model": {}, "where": pathlib.PurePosixPath("/tmp")}))
    message = assert_one_line_error(path, "Detectron2 .pkl")
    assert "pathlib" in message
    assert_one_line_error(an_image(tmp_path / "image.pkl"), "Detectron2 .pkl")


def test_pkl_of_numpy_arrays_loads(tmp_path: Path) -> None:
    weight = np.arange(6, dtype=np.float32).reshape(1, 6, 1, 1)
    path = tmp_path / "r.pkl"
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):  # the model zoo's files are protocol 2
        path.write_bytes(pickle.dumps({"model": {"stem.conv1.weight": weight}, "__author__": "x"}, protocol))
        state = load_state(path)
        assert torch.equal(state["conv1.weight"], torch.from_numpy(weight))


def test_a_file_holding_no_dict(tmp_path: Path) -> None:
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    message = assert_one_line_error(path, "torch checkpoint or state_dict")
    assert "holds a Tensor" in message


def test_missing_file_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        load_state(tmp_path / "nothing.pth")
