"""The ``me`` dataflow's reorder of MinkowskiEngine's strided outputs into block-major order,
checked against an independent construction of that order.

In the engine the canonical map of the output stride is inserted before ME runs, so ME reuses it
and its outputs are canonical already. Here the output stride has NO map in the manager: ME builds
its own (hash order), `me` must put the rows in block-major order, and the result must equal a
dense conv / max-pool on the masked map read at sites sorted by (image, cell row, cell column, row,
column), a sort written here without the engine's geometry.
"""

from __future__ import annotations

import MinkowskiEngine as ME
import pytest
import torch
import torch.nn.functional as F

from spark_me.sparse.geometry import BlockLayout, geometry_of
from spark_me.sparse.me_dataflow import me
from spark_me.sparse.ops import SparseOp
from spark_me.sparse.tensor import sparsify, upsample_mask

CELL, GRID, C_IN, C_OUT = 32, (2, 3), 3, 4


def block_major_rank(coords: torch.Tensor) -> torch.Tensor:
    """[N] rank of each (batch, y, x) site, in pixels, when sorted cell by cell (cells in image,
    row, column order), row-major inside each cell."""
    b, y, x = coords.long().unbind(1)
    h, w = GRID[0] * CELL, GRID[1] * CELL
    cell = (b * GRID[0] + y // CELL) * GRID[1] + x // CELL
    order = torch.argsort((cell * h + y) * w + x)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    return rank


def dense_reference(op: SparseOp, image: torch.Tensor, active: torch.Tensor, weight, bias) -> torch.Tensor:
    """[B, C, H/s, W/s]: F.conv2d / F.max_pool2d over the visible pixels, ME's kernel placement
    (odd kernels centred, even ones spanning offsets 0..k-1)."""
    k, s = op.kernel_size, op.stride
    lo = k // 2 if k % 2 else 0
    pad = (lo, k - 1 - lo, lo, k - 1 - lo)
    visible = upsample_mask(active, *image.shape[2:])
    if op.kind == "maxpool":
        filled = F.pad(image.masked_fill(~visible, float("-inf")), pad, value=float("-inf"))
        return F.max_pool2d(filled, k, s)
    return F.conv2d(F.pad(image * visible, pad), weight, bias, s)


@pytest.mark.parametrize("stride", [2, 4, 8, 16, 32])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("kind", ["conv", "maxpool"])
def test_me_puts_its_own_strided_outputs_in_block_major_order(gen, kind: str, k: int, stride: int) -> None:
    active = torch.rand(2, *GRID, generator=gen) < 0.6
    active[:, 0, 0] = True
    image = torch.randn(2, C_IN, GRID[0] * CELL, GRID[1] * CELL, generator=gen, dtype=torch.float64)
    x = sparsify(image, active)  # a fresh manager holding the stride-1 map only
    geometry = geometry_of(x)
    op = SparseOp(kind, k, stride, C_IN, C_IN if kind == "maxpool" else C_OUT)
    weight = torch.randn(C_OUT, C_IN, k, k, generator=gen, dtype=torch.float64) if kind == "conv" else None
    bias = torch.randn(C_OUT, generator=gen, dtype=torch.float64) if kind == "conv" else None
    # the canonical layout of the output stride, its map NOT inserted in x's manager
    not_inserted = ME.CoordinateMapKey([stride, stride], "not-inserted")
    dst = BlockLayout(geometry, stride, CELL // stride, not_inserted)

    got, key = me(op, x, geometry.layout(1), dst, weight, bias)

    assert key == not_inserted
    (me_key,) = x.coordinate_manager._manager.get_coordinate_map_keys([stride, stride])
    me_coords = x.coordinate_manager.get_coordinates(me_key)
    rank = block_major_rank(me_coords)
    assert torch.equal(geometry.canonical_rows(me_coords, stride), rank)
    if len(rank) > 4:  # ME's own order is not block-major: the reorder did something
        assert not torch.equal(rank, torch.arange(len(rank)))
    canonical = me_coords[torch.argsort(rank)].long()  # the sites in block-major order
    dense = dense_reference(op, image, active, weight, bias)
    expected = dense[canonical[:, 0], :, canonical[:, 1] // stride, canonical[:, 2] // stride]
    assert got.shape == expected.shape
    assert float((got - expected).abs().max()) <= 1e-10 * float(expected.abs().max())
