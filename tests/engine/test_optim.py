"""Optimiser set-up: which parameters get weight decay, the decay ramp, the lr scaling rule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import spark_me
from spark_me.engine.config import PretrainConfig
from spark_me.engine.optim import (
    build_optimizer,
    param_groups,
    scaled_lr,
    set_weight_decay,
    weight_decay_at,
)
from spark_me.sparse.layers import SparseConv2d, SparseDepthwiseConv2d, SparseLinear

from ..models.conftest import TINY

# modules whose `weight` is a matrix/kernel that SparK decays; everything else (norm affines, GRN,
# layer scale, biases, mask tokens) gets no weight decay
KERNELS = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, SparseConv2d, SparseDepthwiseConv2d, SparseLinear)


def expected_decayed(model: nn.Module) -> set[str]:
    """Names of the parameters that should be decayed, from the module types (not from the rule)."""
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, KERNELS):
            names.add(f"{module_name}.weight" if module_name else "weight")
    return names


@pytest.mark.parametrize("arch", ["resnet50", "convnext_atto", "convnextv2_atto"])
def test_weight_decay_groups(arch: str) -> None:
    model = spark_me.SparK(spark_me.create_encoder(arch, **TINY[arch]), decoder_width=64)
    groups = param_groups(model, 0.05)
    by_id = {id(p): n for n, p in model.named_parameters()}
    decay = {by_id[id(p)] for p in groups[0]["params"]}
    no_decay = {by_id[id(p)] for p in groups[1]["params"]}
    assert (groups[0]["weight_decay"], groups[1]["weight_decay"]) == (0.05, 0.0)
    assert decay | no_decay == set(by_id.values()) and not decay & no_decay  # each parameter once
    assert decay == expected_decayed(model)
    # the ones a wrong rule is most likely to decay: the 4-D mask tokens, GRN, layer scale
    assert {f"mask_tokens.{i}" for i in range(4)} <= no_decay
    if arch == "convnextv2_atto":
        assert "encoder.stages.0.blocks.0.mlp.grn.weight" in no_decay
    if arch == "convnext_atto":
        assert "encoder.stages.0.blocks.0.gamma" in no_decay


def test_frozen_parameters_are_left_out() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    groups = param_groups(model, 0.1)
    assert [p.shape for p in groups[0]["params"]] == [torch.Size([2, 4])]
    assert len(groups[1]["params"]) == 2  # the two biases


def test_weight_decay_ramp() -> None:
    """SparK's cosine ramp 0.04 -> 0.2: exact ends, symmetric about the middle, rising throughout."""
    total = 11
    values = [weight_decay_at(s, total, 0.04, 0.2) for s in range(total)]
    assert values[0] == pytest.approx(0.04, abs=1e-15) and values[-1] == pytest.approx(0.2, abs=1e-15)
    assert values[5] == pytest.approx(0.12, abs=1e-15)  # the middle step: halfway
    for s in range(total):  # cosine symmetry: w(s) + w(total-1-s) == start + end
        assert values[s] + values[total - 1 - s] == pytest.approx(0.24, abs=1e-15)
    assert all(a < b for a, b in zip(values, values[1:], strict=False))
    assert weight_decay_at(50, total, 0.04, 0.2) == pytest.approx(0.2)  # past the end: stays at end
    assert weight_decay_at(0, 1, 0.04, 0.2) == pytest.approx(0.04)  # a one-step run


def test_set_weight_decay_touches_the_decay_group_only() -> None:
    model = spark_me.SparK(spark_me.create_encoder("resnet18"), decoder_width=64)
    optimizer = build_optimizer(model, PretrainConfig(arch="resnet18"), lr=1e-3)
    set_weight_decay(optimizer, 0.123)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.123, 0.0]


@pytest.mark.parametrize(
    ("kw", "world", "lr", "eff"),
    [
        (dict(batch_size=32, accum_iter=1, blr=2e-4), 1, 2e-4 * 32 / 256, 32),
        (dict(batch_size=32, accum_iter=4, blr=2e-4), 8, 2e-4 * 1024 / 256, 1024),
        (dict(batch_size=8, accum_iter=3, blr=0.1), 2, 0.1 * 48 / 256, 48),
        (dict(batch_size=8, accum_iter=3, blr=0.1, lr=0.5), 2, 0.5, 48),  # --lr wins
    ],
)
def test_lr_scales_with_the_effective_batch(kw: dict, world: int, lr: float, eff: int) -> None:
    got_lr, got_eff = scaled_lr(PretrainConfig(**kw), world)
    assert got_eff == eff
    assert math.isclose(got_lr, lr, rel_tol=1e-12)
