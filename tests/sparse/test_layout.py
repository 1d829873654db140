"""Kernel layout conversions are exact inverses, and match how ME applies its kernels."""

from __future__ import annotations

import pytest
import torch

from spark_me.sparse.layout import (
    conv_padding,
    conv_weight_to_me_depthwise,
    conv_weight_to_me_kernel,
    me_depthwise_to_conv_weight,
    me_kernel_to_conv_weight,
)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 7])
def test_conv_kernel_round_trip(k: int) -> None:
    weight = torch.randn(5, 3, k, k)
    kernel = conv_weight_to_me_kernel(weight)
    assert kernel.shape == (k * k, 3, 5)
    assert torch.equal(me_kernel_to_conv_weight(kernel, k), weight)


def test_offset_order_is_first_axis_fastest() -> None:
    """Offset (dy, dx) of a 3x3 kernel sits at index dy + 3*dx (ME enumerates y fastest)."""
    weight = torch.zeros(1, 1, 3, 3)
    weight[0, 0, 2, 0] = 1.0  # dy = +1 (index 2), dx = -1 (index 0)
    kernel = conv_weight_to_me_kernel(weight)
    assert kernel[:, 0, 0].nonzero().flatten().tolist() == [2 + 3 * 0]


def test_pointwise_kernel_two_d() -> None:
    weight = torch.randn(6, 4, 1, 1)
    kernel = conv_weight_to_me_kernel(weight, two_d_if_pointwise=True)
    assert kernel.shape == (4, 6)
    assert torch.equal(me_kernel_to_conv_weight(kernel, 1), weight)


@pytest.mark.parametrize("k", [3, 7])
def test_depthwise_round_trip(k: int) -> None:
    weight = torch.randn(8, 1, k, k)
    kernel = conv_weight_to_me_depthwise(weight)
    assert kernel.shape == (k * k, 8)
    assert torch.equal(me_depthwise_to_conv_weight(kernel, k), weight)


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="square"):
        conv_weight_to_me_kernel(torch.zeros(2, 2, 3, 1))
    with pytest.raises(ValueError, match="volume"):
        me_kernel_to_conv_weight(torch.zeros(8, 2, 2), 3)
    with pytest.raises(ValueError, match="depthwise"):
        conv_weight_to_me_depthwise(torch.zeros(4, 2, 3, 3))


def test_padding_rule() -> None:
    assert [conv_padding(k) for k in (1, 2, 3, 4, 7)] == [0, 0, 1, 0, 3]
