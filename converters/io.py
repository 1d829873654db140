"""Reading and writing weight files by extension: .pth/.pt (torch), .safetensors, .pkl (Detectron2)."""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch


class NotACheckpoint(ValueError):
    """A file that cannot be read as weights. The message is one line naming the file and what was
    expected, so the command line can print it as is instead of a library's traceback."""


EXPECTED = {
    ".safetensors": "a safetensors weights file",
    ".pkl": "a Detectron2 .pkl checkpoint (a pickled dict of numpy arrays)",
}
TORCH_EXPECTED = "a torch checkpoint or state_dict (.pth/.pt, saved with torch.save)"

# What a Detectron2 .pkl may reference: numpy arrays and scalars in plain containers. Anything else
# (a class, a function) would run code when unpickled, which loading weights must never do.
# (numpy 2 writes numpy._core, numpy 1 numpy.core; protocol 5 rebuilds arrays with _frombuffer.)
PKL_GLOBALS = {
    (f"{package}.{module}", name)
    for package in ("numpy.core", "numpy._core")
    for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))
} | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"), ("collections", "OrderedDict")}


class _WeightsUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only `PKL_GLOBALS` (the .pkl counterpart of weights_only)."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in PKL_GLOBALS:
            raise pickle.UnpicklingError(f"it references {module}.{name}, not only numpy arrays")
        return super().find_class(module, name)


def _read(path: Path) -> object:
    """The file's content by extension, with no arbitrary code run while reading it."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix == ".pkl":
        from converters.detectron2_format import from_detectron2

        with open(path, "rb") as fh:
            content = _WeightsUnpickler(fh, encoding="latin1").load()  # latin1: Python 2 era model zoo files
        if not isinstance(content, Mapping):
            return content
        return from_detectron2(content)
    return torch.load(path, map_location="cpu", weights_only=True)


def _reason(path: Path, err: BaseException) -> str:
    """Why the file is not weights, in a short line (torch's weights_only refusal is a page)."""
    kind = _image_format(path)
    if kind:
        return f"it is a {kind} image"
    with open(path, "rb") as fh:
        zip_start = fh.read(4) == b"PK\x03\x04"
    if (zip_start and not zipfile.is_zipfile(path)) or isinstance(err, EOFError):
        return f"it is truncated or damaged ({path.stat().st_size} bytes; an interrupted copy or save?)"
    text = str(err)
    if "WeightsUnpickler error:" in text:
        detail = text.split("WeightsUnpickler error:", 1)[1].split(". ", 1)[0].strip()
        text = (
            f"torch.load(weights_only=True) refused it ({detail}): it holds Python objects besides "
            "tensors, which could run code when loaded"
        )
    line = " ".join(text.split())
    return (line[:300] + " ...") if len(line) > 300 else line or type(err).__name__


def _image_format(path: Path) -> str | None:
    """'PNG', 'JPEG', ... when the file is a picture (a common mix-up with a weights file)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.format
    except (OSError, UnidentifiedImageError, ValueError):
        return None


def load_state(path: str | os.PathLike) -> dict:
    """A checkpoint or state_dict, safely: `weights_only=True` for torch files, numpy-only .pkl.

    Raises FileNotFoundError for a missing file and NotACheckpoint (a ValueError) for anything that
    is not readable as weights: an image, a truncated file, a pickle holding code.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint: {path}")
    expected = EXPECTED.get(path.suffix, TORCH_EXPECTED)
    try:
        state = _read(path)
    # Each loader fails in its own way on a foreign file (UnpicklingError, RuntimeError from the zip
    # reader, EOFError, SafetensorError, numpy errors ...): every one of them means "not weights".
    except Exception as err:
        raise NotACheckpoint(f"{path} is not {expected}: {_reason(path, err)}") from err
    if not isinstance(state, Mapping):
        raise NotACheckpoint(f"{path} holds a {type(state).__name__}, expected {expected} holding a dict")
    return dict(state) if not isinstance(state, dict) else state


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
