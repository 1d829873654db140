"""SparK's own parameters start as in the official code: mask tokens, projections, densify norms."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import spark_me
from spark_me.sparse.layers import SparseBatchNorm2d, SparseLayerNorm

from .conftest import TINY


def truncated_std(std: float, bound: float) -> float:
    """Standard deviation of N(0, std^2) truncated to [-bound, bound]."""
    z = bound / std
    pdf = math.exp(-z * z / 2) / math.sqrt(2 * math.pi)
    mass = math.erf(z / math.sqrt(2))
    return std * math.sqrt(1 - 2 * z * pdf / mass)


def test_mask_tokens_are_trunc_normal_cut_at_plus_minus_02() -> None:
    model = spark_me.SparK(spark_me.create_encoder("resnet50", **TINY["resnet50"]), decoder_width=64)
    tokens = torch.cat([t.detach().flatten() for t in model.mask_tokens])
    assert tokens.numel() == 256 + 512 + 1024 + 2048
    assert float(tokens.abs().max()) <= 0.02
    assert float(tokens.abs().max()) > 0.019  # the cut is at the bound, not inside it
    # std of a normal(.02) cut at one standard deviation: ~.0108, far from the untruncated .02
    assert float(tokens.std()) == pytest.approx(truncated_std(0.02, 0.02), rel=0.05)
    assert abs(float(tokens.mean())) < 1e-3


def test_projections_keep_torch_default_conv_init() -> None:
    model = spark_me.SparK(spark_me.create_encoder("resnet18"), decoder_width=768)
    projs = [m for m in model.densify_projs if isinstance(m, nn.Conv2d)]
    assert [(m.in_channels, m.out_channels, m.kernel_size) for m in projs] == [
        (512, 768, (1, 1)),
        (256, 384, (3, 3)),
        (128, 192, (3, 3)),
        (64, 96, (3, 3)),
    ]
    for m in projs:
        # kaiming_uniform(a=sqrt(5)) for the weight and U(+-1/sqrt(fan_in)) for the bias
        bound = 1 / math.sqrt(m.weight[0].numel())
        w, b = m.weight.detach(), m.bias.detach()
        assert float(w.abs().max()) <= bound
        assert float(w.std()) == pytest.approx(bound / math.sqrt(3), rel=0.03)
        assert float(b.abs().max()) <= bound and float(b.std()) > bound / 4  # not zeroed


def test_projection_is_identity_when_widths_match() -> None:
    encoder = spark_me.create_encoder("resnet18")
    model = spark_me.SparK(encoder, decoder_width=encoder.channels[-1])
    assert isinstance(model.densify_projs[0], nn.Identity)


def test_densify_norms_match_the_official_sparse_norms() -> None:
    convnext = spark_me.SparK(
        spark_me.create_encoder("convnext_atto", **TINY["convnext_atto"]), decoder_width=64
    )
    assert all(type(n) is SparseLayerNorm and n.eps == 1e-6 for n in convnext.densify_norms)
    resnet = spark_me.SparK(spark_me.create_encoder("resnet18"), decoder_width=64)
    assert all(type(n) is SparseBatchNorm2d for n in resnet.densify_norms)
