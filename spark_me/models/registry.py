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


# timm families run through the generic path (spark_me/models/generic.py) and tested against an
# independent masked-dense oracle (tests/models/test_generic.py); any other timm CNN whose ops all
# have sparse handlers runs too, and one that has an op without one is refused at creation.
TESTED_TIMM = (
    "resnet50d", "resnext50_32x4d", "seresnext50_32x4d", "regnetx_016", "regnety_016", "efficientnet_b0",
    "efficientnet_lite0", "mobilenetv2_100", "mobilenetv3_large_100", "densenet121", "cspdarknet53",
    "dla34", "ghostnet_100", "repvgg_a2",
)  # fmt: skip


def list_encoders(pattern: str = "*") -> list[str]:
    """The hand-written encoders and the tested timm families (any other timm CNN may work too)."""
    _ensure_loaded()
    return sorted(name for name in {*_ENCODERS, *TESTED_TIMM} if fnmatch.fnmatch(name, pattern))


def is_hand_written(arch: str) -> bool:
    """Whether `create_encoder(arch)` builds a hand-written encoder (ResNet, ConvNeXt V1/V2)."""
    _ensure_loaded()
    return arch in _ENCODERS


def create_encoder(
    arch: str | nn.Module,
    dataflow: str = "auto",
    *,
    generic: bool = False,
    stages: list[str] | None = None,
    **kwargs,
) -> nn.Module:
    """Build a sparse encoder, e.g. `create_encoder("resnet50", drop_path_rate=0.05)`.

    arch: a spark-me / timm model name, or a model (`nn.Module`) of one's own, which is run as it is
    (shared, not copied; modules after its last stage are removed from it). Names of the hand-written
    families (ResNet, ConvNeXt V1/V2) get their hand-written encoder unless `generic=True`; any other
    timm name is created with `timm.create_model(arch, num_classes=0, **kwargs)` and run generically.
    stages: the generic path's four stage modules (default: timm's feature_info).
    `dataflow`: how its sparse convs are computed: "auto" (each op's fastest dataflow, measured on
    first use), "rules", or one of "block", "dense", "gemm", "me" everywhere (see spark_me.sparse).
    """
    _ensure_loaded()
    if isinstance(arch, nn.Module):
        encoder = _generic(arch, stages, type(arch).__name__)
    elif arch in _ENCODERS and not generic:
        encoder = _ENCODERS[arch](**kwargs)
    else:
        encoder = _generic(_timm_model(arch, kwargs), stages, arch)
    encoder.set_dataflow(dataflow)
    return encoder


def load_factory(spec: str) -> Callable[..., nn.Module]:
    """'package.module:factory' -> the factory (a function or class building an `nn.Module`)."""
    import importlib

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--model {spec!r}: expected 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"--model {spec!r}: cannot import {module_name} ({err})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"--model {spec!r}: {module_name} has no callable {attr!r}")
    return factory


def _timm_model(arch: str, kwargs: dict) -> nn.Module:
    import timm

    if not timm.is_model(arch):
        known = sorted(_ENCODERS) + list(TESTED_TIMM)
        close = [n for n in known if n.split("_")[0] == arch.split("_")[0]] or known
        raise ValueError(
            f"unknown architecture {arch!r}: not a timm model; tested: {', '.join(sorted(close))}"
        )
    return timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)


def _generic(model: nn.Module, stages: list[str] | None, name: str) -> nn.Module:
    from spark_me.models.generic import GenericSparseEncoder

    return GenericSparseEncoder(model, stages=stages, name=name)
