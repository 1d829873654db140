"""The light decoder's initialisation follows the official SparK rule by rule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from spark_me.models.decoder import LightDecoder


@pytest.fixture(scope="module")
def decoder() -> LightDecoder:
    torch.manual_seed(0)
    return LightDecoder(768, up_ratio=32)  # the official width: blocks 768, 384, 192, 96, 48


def test_upsampling_convs_are_kaiming_normal_fan_out(decoder: LightDecoder) -> None:
    ups = [m for m in decoder.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [m.in_channels for m in ups] == [768, 384, 192, 96, 48]
    for m in ups:
        # ConvTranspose2d's weight is [in, out, k, k]: torch's fan_out is in * k * k
        expected = math.sqrt(2.0 / (m.weight.shape[0] * m.weight[0, 0].numel()))
        w = m.weight.detach()
        assert float(w.std()) == pytest.approx(expected, rel=0.03), m
        assert abs(float(w.mean())) < 0.05 * expected
        assert float(w.abs().max()) > 3.5 * expected  # a normal, not trunc-normal or uniform
        assert torch.count_nonzero(m.bias) == 0
    assert float(ups[0].weight.detach().std()) == pytest.approx(0.0128, abs=3e-4)  # the REFERENCE figures
    assert float(ups[-1].weight.detach().std()) == pytest.approx(0.051, abs=2e-3)


def test_convs_are_trunc_normal_02_with_zero_bias(decoder: LightDecoder) -> None:
    convs = [m for m in decoder.modules() if type(m) is nn.Conv2d]
    assert len(convs) == 2 * 5 + 1  # two 3x3 per block, the final 1x1
    big = torch.cat([m.weight.detach().flatten() for m in convs])
    assert float(big.std()) == pytest.approx(0.02, rel=0.02)
    assert float(big.abs().max()) > 0.07  # torch's a/b (+-2) cut nothing at std .02
    assert decoder.proj.bias is not None and torch.count_nonzero(decoder.proj.bias) == 0


def test_norms_start_as_identity(decoder: LightDecoder) -> None:
    norms = [m for m in decoder.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 10
    for m in norms:
        assert torch.equal(m.weight, torch.ones_like(m.weight))
        assert torch.equal(m.bias, torch.zeros_like(m.bias))
