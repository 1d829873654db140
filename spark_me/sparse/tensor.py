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
    """
    batch, channels, height, width = dense.shape
    if active.shape[0] != batch:
        raise ValueError(f"mask batch {active.shape[0]} != feature batch {batch}")
    active = active.to(device=dense.device, dtype=torch.bool)
    coords = active_coordinates(active, height, width, stride)
    feats = dense.permute(0, 2, 3, 1)[upsample_mask(active, height, width)[:, 0]]  # [N, C]
    return ME.SparseTensor(
        features=feats.contiguous(),
        coordinates=coords,
        tensor_stride=stride,
        coordinate_manager=coordinate_manager,
    )


def densify(x: ME.SparseTensor, shape: tuple[int, int, int, int] | torch.Size) -> Tensor:
    """SparseTensor -> dense [B, C, H, W] with zeros at inactive sites.

    The shape is always explicit: inferring it from the coordinates shrinks the map when the last
    row/column of cells is masked in every image. Differentiable with respect to `x.F`.
    """
    batch, channels, height, width = shape
    stride = x.tensor_stride[0]
    coords = x.C.long()
    b, y, xx = coords[:, 0], coords[:, 1] // stride, coords[:, 2] // stride
    if coords.numel() and (y.max() >= height or xx.max() >= width or b.max() >= batch):
        raise ValueError(f"sparse sites fall outside the dense shape {tuple(shape)}")
    feats = x.F
    if feats.shape[1] != channels:
        raise ValueError(f"sparse tensor has {feats.shape[1]} channels, shape asks for {channels}")
    out = feats.new_zeros(batch, height, width, channels)
    out = out.index_put((b, y, xx), feats)
    return out.permute(0, 3, 1, 2).contiguous()


def occupancy(x: ME.SparseTensor, shape: tuple[int, int, int, int] | torch.Size) -> Tensor:
    """[B, 1, H, W] bool: which sites of the dense map `shape` the sparse tensor holds."""
    ones = ME.SparseTensor(
        x.F.new_ones(len(x.F), 1),
        coordinate_map_key=x.coordinate_map_key,
        coordinate_manager=x.coordinate_manager,
    )
    return densify(ones, (shape[0], 1, *shape[2:])) > 0
