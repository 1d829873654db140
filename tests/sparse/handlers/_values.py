"""A `SparseValue` to call handlers on directly, and its masked-dense counterpart."""

from __future__ import annotations

import torch
from torch import Tensor

from spark_me.sparse import handlers  # noqa: F401  (fills the handler registry)
from spark_me.sparse.geometry import layout_of
from spark_me.sparse.tensor import sparsify
from spark_me.sparse.value import ExecutionContext, SparseValue


def value_and_dense(
    batch: int = 2, channels: int = 4, height: int = 64, width: int = 96, stride: int = 8, seed: int = 0
) -> tuple[SparseValue, Tensor, Tensor]:
    """(value at `stride`, the dense map [B, C, H/s, W/s] it holds (0 at masked sites), the
    visibility [B, 1, H/s, W/s] bool); one cell of the first image is masked."""
    gen = torch.Generator().manual_seed(seed)
    active = torch.ones(batch, height // 32, width // 32, dtype=torch.bool)
    active[0, 0, 1] = False
    r = 32 // stride
    visible = active.repeat_interleave(r, 1).repeat_interleave(r, 2)[:, None]
    dense = torch.randn(
        batch, channels, height // stride, width // stride, generator=gen, dtype=torch.float64
    )
    dense = dense * visible
    x = sparsify(dense, active, stride=stride)
    value = SparseValue(x.F, layout_of(x), False, ExecutionContext(model="test"))
    return value, dense, visible


def densify(value: SparseValue) -> Tensor:
    """The value's features scattered into a zero-filled [B, C, H, W] map (channels-first only)."""
    b = value.batch
    height, width = value.sites.dense_hw
    canvas = value.feats.new_zeros(b * height * width, value.feats.shape[1])
    canvas[value.sites.dense_index()] = value.feats
    return canvas.view(b, height, width, -1).permute(0, 3, 1, 2)
