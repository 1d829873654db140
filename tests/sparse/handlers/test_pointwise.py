"""Elementwise handlers: broadcasts, expand_as, casts led by a dense tensor, operands of other ranks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from spark_me.sparse.value import SparseValue, UnsupportedOp

from ._values import densify, value_and_dense


def test_expand_as_of_a_per_image_gate_has_the_maps_shape() -> None:
    x, dense, visible = value_and_dense()
    gate = torch.arange(2.0, dtype=torch.float64).view(2, 1, 1, 1)
    expanded = gate.expand_as(x)
    assert isinstance(expanded, SparseValue) and expanded.shape == x.shape
    torch.testing.assert_close(densify(expanded), gate.expand_as(dense) * visible, rtol=0, atol=0)
    both = torch.cat([expanded, x], 1)
    assert both.shape[1] == 2 * x.shape[1]


def test_a_dense_tensor_cast_like_a_map_stays_dense() -> None:
    x, _, _ = value_and_dense()
    scale = torch.ones(1, 4, 1, 1, dtype=torch.float32)
    for cast in (scale.type_as(x), scale.to(x)):
        assert type(cast) is torch.Tensor and cast.dtype == torch.float64 and cast.shape == scale.shape


def test_maps_of_different_ranks_are_refused() -> None:
    x, _, _ = value_and_dense()
    per_site = x.sum(1)  # [B, H, W]: not broadcastable site by site against [B, C, H, W]
    with pytest.raises(UnsupportedOp, match="different ranks"):
        per_site * x
    with pytest.raises(UnsupportedOp, match="different ranks"):
        x + per_site


def test_a_full_dense_map_is_read_at_the_visible_sites() -> None:
    """`x * pos + pos` with a map that varies over space ([1, C, H, W] positional, [B, 1, H, W] per
    image, and channels-last [H, W, C]): per site, the map's value at that site, i.e. the dense op
    kept at the visible sites. (The masked-dense oracle refuses such operands outright.)"""
    x, dense, visible = value_and_dense()
    gen = torch.Generator().manual_seed(5)
    for shape in ((1, 4, 8, 12), (2, 1, 8, 12)):
        pos = torch.randn(shape, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(densify(x * pos + pos), (dense * pos + pos) * visible, rtol=0, atol=1e-15)
    pos = torch.randn(8, 12, 4, generator=gen, dtype=torch.float64)
    got = densify((x.permute(0, 2, 3, 1) - pos).permute(0, 3, 1, 2))
    torch.testing.assert_close(got, (dense - pos.permute(2, 0, 1)) * visible, rtol=0, atol=1e-15)


def test_glu_and_prelu_act_along_torchs_dims() -> None:
    """glu halves its `dim` (default -1: the width of a channels-first map, refused); prelu weights
    dim 1 (the channels of a channels-first map only)."""
    x, dense, visible = value_and_dense(channels=4)
    torch.testing.assert_close(densify(F.glu(x, 1)), F.glu(dense, 1) * visible[:, :1].expand(-1, 2, -1, -1))
    last = F.glu(x.permute(0, 2, 3, 1), dim=-1).permute(0, 3, 1, 2)
    torch.testing.assert_close(densify(last), F.glu(dense, 1) * visible)
    weight = torch.tensor([0.1, -0.2, 0.3, 0.4], dtype=torch.float64)
    torch.testing.assert_close(densify(F.prelu(x, weight)), F.prelu(dense, weight))
    with pytest.raises(UnsupportedOp, match="glu along dim 3"):
        F.glu(x)
    with pytest.raises(UnsupportedOp, match="prelu"):
        F.prelu(x.permute(0, 2, 3, 1), weight)
