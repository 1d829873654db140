"""Between dense images/feature maps and MinkowskiEngine sparse tensors.

Coordinates are (batch, y, x) in input-pixel units, as ME expects: a site of a map at stride s has
y, x multiples of s. They are built from the patch mask, never from the feature values
(`ME.to_sparse` would drop visible pixels that happen to be exactly zero), and passed as contiguous
int32, which ME's coordinate manager requires.
"""

from __future__ import annotations

import MinkowskiEngine as ME
import torch
from torch import Tensor

from spark_me.sparse.geometry import BlockGeometry, attach_geometry, geometry_of_manager, layout_of


def upsample_mask(active: Tensor, height: int, width: int) -> Tensor:
    """[B, h, w] bool -> [B, 1, H, W] bool, each mask cell repeated over the pixels it covers."""
    batch, h, w = active.shape
    if height % h or width % w:
        raise ValueError(f"map {height}x{width} is not a whole number of mask cells {h}x{w}")
    return active.repeat_interleave(height // h, 1).repeat_interleave(width // w, 2).unsqueeze(1)


def active_coordinates(active: Tensor, height: int, width: int, stride: int = 1) -> Tensor:
    """Coordinates [N, 3] int32 of the sites of a height x width map at `stride` inside active cells.

    Row order is row-major (batch, y, x), the same as `dense[mask]` indexing, so features gathered
    with the returned index line up with the coordinates.
    """
    sites = upsample_mask(active, height, width)[:, 0].nonzero()  # [N, 3] (b, i, j)
    sites[:, 1:] *= stride
    return sites.to(torch.int32).contiguous()


def sparsify(
    dense: Tensor,
    active: Tensor,
    stride: int = 1,
    coordinate_manager: ME.CoordinateManager | None = None,
) -> ME.SparseTensor:
    """Dense [B, C, H, W] at `stride` -> SparseTensor holding only the sites inside active cells.

    `active` is [B, h, w] with H, W multiples of h, w. Features [N, C] keep the dtype of `dense`.
    With square cells the rows are block-major (`spark_me.sparse.geometry`) and the batch's block
    geometry is attached to the coordinate manager, which lets the fast dataflows run; otherwise
    (non-square cells, or a manager that already serves another mask) rows are row-major and
    layers use MinkowskiEngine's own functions.
    """
    batch, channels, height, width = dense.shape
    if active.shape[0] != batch:
        raise ValueError(f"mask batch {active.shape[0]} != feature batch {batch}")
    active = active.to(device=dense.device, dtype=torch.bool)
    grid_h, grid_w = active.shape[1:]
    upsample_mask(active[:1], height, width)  # validates the cell sizes
    cell_h, cell_w = height // grid_h, width // grid_w
    if coordinate_manager is None:
        coordinate_manager = ME.CoordinateManager(
            D=2,
            coordinate_map_type=ME.CoordinateMapType.CUDA if dense.is_cuda else ME.CoordinateMapType.CPU,
        )
    geometry = geometry_of_manager(coordinate_manager)
    if cell_h == cell_w and (geometry is None or geometry.matches(active, cell_h * stride)):
        if geometry is None:
            geometry = BlockGeometry(coordinate_manager, active, cell_h * stride)
            attach_geometry(coordinate_manager, geometry)
        blocks = dense.reshape(batch, channels, grid_h, cell_h, grid_w, cell_w).permute(0, 2, 4, 3, 5, 1)
        feats = blocks[active].reshape(-1, channels)  # [n_cells * b * b, C], block-major
        layout = geometry.layout(stride)
        return ME.SparseTensor(feats, coordinate_map_key=layout.key, coordinate_manager=coordinate_manager)
    coords = active_coordinates(active, height, width, stride)
    feats = dense.permute(0, 2, 3, 1)[upsample_mask(active, height, width)[:, 0]]  # [N, C]
    return ME.SparseTensor(
        features=feats.contiguous(),
        coordinates=coords,
        tensor_stride=stride,
        coordinate_manager=coordinate_manager,
    )


def densify(
    x: ME.SparseTensor, shape: tuple[int, int, int, int] | torch.Size, fill: Tensor | None = None
) -> Tensor:
    """SparseTensor -> dense [B, C, H, W] (channels-last memory) with `fill` [C] (default 0) at
    inactive sites.

    The shape is always explicit: inferring it from the coordinates shrinks the map when the last
    row/column of cells is masked in every image. Differentiable with respect to `x.F` and `fill`.
    Channels-last because that is the layout the sites already have ([N, C] rows): writing them
    needs no transpose, and dense convs run at least as fast on it.
    """
    if x.F.shape[1] != shape[1]:
        raise ValueError(f"sparse tensor has {x.F.shape[1]} channels, shape asks for {shape[1]}")
    return scatter_rows(x.F, dense_rows(x, shape), shape, fill)


def dense_rows(x: ME.SparseTensor, shape: tuple[int, int, int, int] | torch.Size) -> Tensor:
    """[N] long: where each row of `x.F` lands in the flattened (B, H, W) sites of the dense `shape`."""
    batch, _, height, width = shape
    layout = layout_of(x)
    if layout is not None and layout.dense_hw == (height, width) and layout.geometry.active.shape[0] == batch:
        return layout.dense_index()
    stride = x.tensor_stride[0]
    coords = x.C.long().to(x.F.device)
    b, y, xx = coords[:, 0], coords[:, 1] // stride, coords[:, 2] // stride
    if coords.numel() and (y.max() >= height or xx.max() >= width or b.max() >= batch):
        raise ValueError(f"sparse sites fall outside the dense shape {tuple(shape)}")
    return (b * height + y) * width + xx


def scatter_rows(
    feats: Tensor, rows: Tensor, shape: tuple[int, int, int, int] | torch.Size, fill: Tensor | None = None
) -> Tensor:
    """feats [N, C] written at `rows` [N] of a dense [B, C, H, W] map (channels-last memory) that
    holds `fill` [C] (default 0) elsewhere.

    Plain torch on plain tensors (no MinkowskiEngine object), so that `torch.compile` can trace it
    with N symbolic: a new mask, hence a new number of visible sites, reuses the compiled kernels.
    """
    batch, channels, height, width = shape
    if fill is None:
        canvas = feats.new_zeros(batch * height * width, channels)
    else:
        canvas = fill.to(feats.dtype).reshape(1, channels).expand(batch * height * width, channels)
    canvas = canvas.index_copy(0, rows, feats)
    return canvas.view(batch, height, width, channels).permute(0, 3, 1, 2)


def occupancy(x: ME.SparseTensor, shape: tuple[int, int, int, int] | torch.Size) -> Tensor:
    """[B, 1, H, W] bool: which sites of the dense map `shape` the sparse tensor holds."""
    ones = ME.SparseTensor(
        x.F.new_ones(len(x.F), 1),
        coordinate_map_key=x.coordinate_map_key,
        coordinate_manager=x.coordinate_manager,
    )
    return densify(ones, (shape[0], 1, *shape[2:])) > 0
