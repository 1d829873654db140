"""A registry of sparse encoders, named exactly like the timm models they export to."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

from torch import nn

_ENCODERS: dict[str, Callable[..., nn.Module]] = {}


def register_encoder(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: the function's name is the architecture name (the timm model name)."""
    if fn.__name__ in _ENCODERS:
        raise ValueError(f"encoder {fn.__name__!r} registered twice")
    _ENCODERS[fn.__name__] = fn
    return fn


def _ensure_loaded() -> None:
    # Importing the model families fills the registry.
    from spark_me.models import convnext, resnet  # noqa: F401


def list_encoders(pattern: str = "*") -> list[str]:
    _ensure_loaded()
    return sorted(name for name in _ENCODERS if fnmatch.fnmatch(name, pattern))


def create_encoder(arch: str, dataflow: str = "auto", **kwargs) -> nn.Module:
    """Build a sparse encoder, e.g. `create_encoder("resnet50", drop_path_rate=0.05)`.

    `dataflow`: how its sparse convs are computed: "auto" (each op's fastest dataflow, measured on
    first use), "rules", or one of "block", "dense", "gemm", "me" everywhere (see spark_me.sparse).
    """
    _ensure_loaded()
    if arch not in _ENCODERS:
        close = [n for n in _ENCODERS if n.split("_")[0] == arch.split("_")[0]] or sorted(_ENCODERS)
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(sorted(close))}")
    encoder = _ENCODERS[arch](**kwargs)
    encoder.set_dataflow(dataflow)
    return encoder
