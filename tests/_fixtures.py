"""Helpers shared by the equivalence tests (models, converters, detection, benchmarks).

`randomize` is THE way a test gives a model non-trivial norms: the inits it replaces (BN weight 1,
bias 0, running stats 0/1, timm's zero-initialised last BN of every ResNet block, ConvNeXt's layer
scale 1e-6, GRN 0) make whole residual branches vanish, so a comparison of features would not see
a mis-mapped or missing tensor inside the blocks. `perturbations` gives the mistakes such a
comparison must detect (tests/test_fixtures.py checks that it does).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
from torch import nn

RUNNING_VAR = (1.5, 2.5)  # BN running variances: positive, away from 1
MAGNITUDE = (0.3, 0.7)  # everything else: |value| in this range, random sign (away from 0 and 1)


def randomize(module: nn.Module, gen: torch.Generator) -> None:
    """Every norm weight/bias, BN running mean/var, layer scale, GRN weight/bias and mask token
    (every floating-point tensor with at most one non-singleton dimension, so biases too) gets a
    random value well away from 0 and 1. Convolution/linear kernels keep their random init."""
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if not tensor.is_floating_point() or sum(d > 1 for d in tensor.shape) > 1:
                continue
            shape = tensor.shape
            if name.endswith("running_var"):
                low, high = RUNNING_VAR
                value = low + (high - low) * torch.rand(shape, generator=gen, dtype=torch.float64)
            else:
                low, high = MAGNITUDE
                magnitude = low + (high - low) * torch.rand(shape, generator=gen, dtype=torch.float64)
                sign = torch.randint(0, 2, shape, generator=gen, dtype=torch.float64) * 2 - 1
                value = magnitude * sign
            tensor.copy_(value.to(tensor.dtype))  # state_dict tensors share storage with the module


# two same-shaped tensors in different blocks, and one tensor inside a block, per family (present in
# the full models and in SELF_TEST's small ones)
_SWAP = {
    "resnet_basic": ("layer1.0.bn2.weight", "layer1.1.bn2.weight"),
    "resnet_bottleneck": ("layer2.0.bn3.weight", "layer2.1.bn3.weight"),
    "convnext": ("stages.2.blocks.0.gamma", "stages.2.blocks.1.gamma"),
    "convnextv2": ("stages.2.blocks.0.mlp.grn.weight", "stages.2.blocks.1.mlp.grn.weight"),
}
_DROP = {
    "resnet_basic": "layer2.1.bn2.weight",
    "resnet_bottleneck": "layer3.0.bn3.weight",
    "convnext": "stages.1.blocks.0.gamma",
    "convnextv2": "stages.1.blocks.0.mlp.grn.bias",
}


SELF_TEST = {
    "resnet18": {},
    "resnet50": dict(layers=(1, 2, 1, 1)),
    "convnext_atto": dict(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32)),
    "convnextv2_atto": dict(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32)),
}


def family(arch: str) -> str:
    if arch in ("resnet18", "resnet34"):
        return "resnet_basic"
    if arch.startswith("resnet"):
        return "resnet_bottleneck"
    return "convnextv2" if arch.startswith("convnextv2") else "convnext"


def perturbations(arch: str, state: dict, fresh: dict) -> Iterator[tuple[str, dict]]:
    """(what, state) with one mistake a weight mapping can make: two block tensors swapped, or one
    tensor dropped (left at its initial value `fresh[key]`, as a non-strict load leaves it)."""
    a, b = _SWAP[family(arch)]
    swapped = dict(state)
    swapped[a], swapped[b] = state[b], state[a]
    yield f"swapped {a} <-> {b}", swapped
    key = _DROP[family(arch)]
    dropped = dict(state)
    dropped[key] = fresh[key]
    yield f"dropped {key}", dropped


def max_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))


def require_detectron2() -> None:
    """Detectron2 is part of the test set-up (`python3 -m spark_me.bootstrap test` installs it and
    sets SPARK_ME_REQUIRE_DETECTRON2=1): there a missing Detectron2 is an error; a bare `pytest`
    without it skips the test with the set-up command, never falls back to something weaker."""
    if os.environ.get("SPARK_ME_REQUIRE_DETECTRON2") == "1":
        import detectron2  # noqa: F401
    else:
        pytest.importorskip(
            "detectron2", reason="Detectron2 not installed: python3 -m spark_me.bootstrap setup"
        )
