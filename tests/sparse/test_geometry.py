"""Block-major layouts and their index tables, checked against brute force on the coordinates."""

from __future__ import annotations

import torch

from spark_me.sparse.geometry import geometry_of, layout_of
from spark_me.sparse.tensor import densify, sparsify


def make(gen: torch.Generator, stride: int = 4):
    active = torch.rand(2, 3, 5, generator=gen) < 0.5
    active[0, 0, 0] = active[1, 2, 4] = True
    b = 32 // stride
    x = torch.randn(2, 6, 3 * b, 5 * b, generator=gen, dtype=torch.float64)
    return x, active, sparsify(x, active, stride=stride)


def test_rows_are_block_major_and_match_the_coordinates(gen) -> None:
    x, active, s = make(gen)
    layout = layout_of(s)
    assert layout is not None and layout.block == 8
    coords = s.C.long()
    cells = coords[:, 1:] // 32
    pos = (coords[:, 1:] % 32) // 4
    rows = torch.arange(len(coords))
    assert torch.equal(rows // 64, torch.repeat_interleave(torch.arange(layout.num_cells), 64))
    assert torch.equal(pos[:, 0] * 8 + pos[:, 1], rows % 64)
    assert torch.equal(torch.cat([coords[:, :1], cells], 1)[::64], geometry_of(s).cells)
    # the features at each coordinate are the dense values there
    assert torch.equal(s.F, x[coords[:, 0], :, coords[:, 1] // 4, coords[:, 2] // 4])
    assert torch.equal(
        densify(s, x.shape), x * active.repeat_interleave(8, 1).repeat_interleave(8, 2)[:, None]
    )


def test_halo_index_is_the_neighbourhood_of_each_block(gen) -> None:
    _, active, s = make(gen, stride=16)  # 2x2 blocks, a 3-site halo reaches two cells away
    layout, halo = layout_of(s), 3
    index = layout.halo_index(halo)
    coords = s.C.long()
    where = {(int(c[0]), int(c[1]) // 16, int(c[2]) // 16): r for r, c in enumerate(coords)}
    for cell, (bi, cy, cx) in enumerate(geometry_of(s).cells.tolist()):
        for u in range(2 + 2 * halo):
            for v in range(2 + 2 * halo):
                y, x = cy * 2 - halo + u, cx * 2 - halo + v
                expected = where.get((bi, y, x), layout.num_sites)
                assert int(index[cell, u, v]) == expected, (cell, u, v)


def test_strided_layouts_and_canonical_rows(gen) -> None:
    _, active, s = make(gen, stride=4)
    geometry = geometry_of(s)
    for stride in (8, 16, 32):
        layout = geometry.layout(stride)
        coords = geometry.manager.get_coordinates(layout.key)
        assert torch.equal(geometry.canonical_rows(coords, stride), torch.arange(layout.num_sites))
        assert layout.num_sites == int(active.sum()) * (32 // stride) ** 2
    # shuffled coordinates map back to their canonical rows
    coords = geometry.manager.get_coordinates(geometry.layout(8).key)
    perm = torch.randperm(len(coords), generator=gen)
    assert torch.equal(geometry.canonical_rows(coords[perm], 8), perm)


def test_non_square_cells_fall_back_to_row_major(gen) -> None:
    x = torch.randn(1, 2, 8, 12, generator=gen)
    active = torch.ones(1, 2, 2, dtype=torch.bool)  # 4x6 cells
    s = sparsify(x, active)
    assert layout_of(s) is None
    assert torch.equal(densify(s, x.shape), x)
