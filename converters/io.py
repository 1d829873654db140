"""Reading and writing weight files by extension: .pth/.pt (torch), .safetensors, .pkl (Detectron2)."""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path

import torch


def load_state(path: str | os.PathLike) -> dict:
    """A checkpoint or state_dict, safely: `weights_only=True` for torch files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix == ".pkl":
        from converters.detectron2_format import from_detectron2

        with open(path, "rb") as fh:
            return from_detectron2(pickle.load(fh))
    return torch.load(path, map_location="cpu", weights_only=True)


def save_state(state: dict, path: str | os.PathLike) -> Path:
    """Atomic write (temp file + rename): an interrupted save never leaves a truncated file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in state.items()}, tmp)
        elif path.suffix == ".pkl":
            with open(tmp, "wb") as fh:
                pickle.dump(state, fh)
        else:
            torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
