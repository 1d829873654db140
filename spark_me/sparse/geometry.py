"""Block geometry of patch-aligned sparse maps: what makes SparK's sparsity cheap to compute on.

SparK masks whole cells of the stride-32 grid, so at any stride s that divides the cell size every
visible cell is a full dense b x b block of sites (b = cell / s). Every map this project creates
holds its sites **block-major**: row = cell * b*b + yy * b + xx, cells in (batch, y, x) order. Then

* the features of a map are a free view `[n_cells, b, b, C]` (a batch of small dense images),
* a k x k neighbourhood of every site is one gather through a precomputed "halo index"
  `[n_cells, b+2h, b+2h]` (h = k//2; entries pointing at masked or out-of-image cells point at a
  pad row), which serves as the kernel map of the block and gather-GEMM dataflows,
* the output sites of a strided op are again full blocks, in the same cell order, so strided
  outputs come out block-major without any sorting.

`BlockGeometry` belongs to one `ME.CoordinateManager` (one batch): it is created by `sparsify`,
attached to the manager (the per-batch object that ME already threads through every layer), and
inserts one canonical coordinate map per stride into that manager. Layers find it with
`geometry_of(x)`; tensors not made by `sparsify` have none and run on ME's own functions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import MinkowskiEngine as ME
import torch
from torch import Tensor

_ATTR = "_spark_block_geometry"


@dataclass
class BlockLayout:
    """The sites of one stride, block-major, and the index tables the dataflows gather through."""

    geometry: BlockGeometry
    stride: int  # tensor stride in input-pixel units
    block: int  # b: sites per cell side at this stride
    key: ME.CoordinateMapKey  # the canonical (block-major) map in the manager
    _halo: dict[int, Tensor] = field(default_factory=dict, repr=False)
    _windows: dict[tuple[int, int, int], Tensor] = field(default_factory=dict, repr=False)
    _dense: Tensor | None = field(default=None, repr=False)
    _batch: Tensor | None = field(default=None, repr=False)

    @property
    def num_cells(self) -> int:
        return self.geometry.num_cells

    @property
    def num_sites(self) -> int:
        return self.geometry.num_cells * self.block * self.block

    @property
    def dense_hw(self) -> tuple[int, int]:
        """Height and width of the full map at this stride."""
        _, hc, wc = self.geometry.active.shape
        return hc * self.block, wc * self.block

    def halo_index(self, halo: int) -> Tensor:
        """[n_cells, b+2h, b+2h] long: the row of every site of each block grown by `halo` sites.

        Sites in masked or out-of-image cells get `num_sites` (the pad row the caller appends).
        """
        if halo not in self._halo:
            self._halo[halo] = self.geometry.neighbourhood(self.block, halo)
        return self._halo[halo]

    def window_index(self, halo: int, kernel_size: int, stride: int) -> Tensor:
        """[N_out, k*k] long: the input row under each kernel offset (ky, kx) of every output site.

        The kernel map of a k x k / stride conv in table form, cut from the halo index; output
        sites are those of the stride `self.stride * stride` layout, block-major.
        """
        key = (halo, kernel_size, stride)
        if key not in self._windows:
            windows = self.halo_index(halo).unfold(1, kernel_size, stride).unfold(2, kernel_size, stride)
            self._windows[key] = windows.reshape(-1, kernel_size * kernel_size)
        return self._windows[key]

    def dense_index(self) -> Tensor:
        """[N] long: flat position (b, y, x) of every row in the full [B, H/s, W/s] map."""
        if self._dense is None:
            g, b = self.geometry, self.block
            _, hc, wc = g.active.shape
            cells = g.cells
            yy = torch.arange(b, device=cells.device)
            y = (cells[:, 1, None] * b + yy).view(-1, b, 1)  # [n, b, 1]
            x = (cells[:, 2, None] * b + yy).view(-1, 1, b)  # [n, 1, b]
            flat = (cells[:, 0].view(-1, 1, 1) * (hc * b) + y) * (wc * b) + x
            self._dense = flat.reshape(-1)
        return self._dense

    def batch_index(self) -> Tensor:
        """[N] long: the image of every row."""
        if self._batch is None:
            self._batch = self.geometry.cells[:, 0].repeat_interleave(self.block * self.block)
        return self._batch


class BlockGeometry:
    """The visible cells of one batch and the canonical block-major map of each stride.

    active: [B, h, w] bool, the visible cells; cell: the cell side in input-pixel units (32 for
    SparK; any size that the strides used divide).
    """

    def __init__(self, manager: ME.CoordinateManager, active: Tensor, cell: int):
        self.manager = manager
        self.active = active.to(torch.bool)
        self.cell = cell
        self.cells = self.active.nonzero()  # [n, 3] (b, cy, cx), row-major cell order
        self.num_cells = len(self.cells)
        # Cell id of every grid position, with a ring of -1 wide enough for any halo asked later.
        self._ids = torch.full_like(self.active, -1, dtype=torch.long)
        self._ids[self.active] = torch.arange(self.num_cells, device=active.device)
        self._layouts: dict[int, BlockLayout] = {}

    def matches(self, active: Tensor, cell: int) -> bool:
        """Whether this geometry describes the mask `active` with cells of `cell` pixels."""
        return cell == self.cell and active.shape == self.active.shape and bool((active == self.active).all())

    # -- maps -----------------------------------------------------------------------------------
    def has_stride(self, stride: int) -> bool:
        return stride >= 1 and self.cell % stride == 0

    def coordinates(self, stride: int) -> Tensor:
        """[N, 3] int32 (batch, y, x) of the sites at `stride`, block-major."""
        b = self.cell // stride
        pos = torch.arange(b, device=self.cells.device)
        n = self.num_cells
        ys = (self.cells[:, 1, None, None] * b + pos.view(1, b, 1)).expand(n, b, b)
        xs = (self.cells[:, 2, None, None] * b + pos.view(1, 1, b)).expand(n, b, b)
        bs = self.cells[:, 0, None, None].expand(n, b, b)
        coords = torch.stack((bs, ys * stride, xs * stride), dim=-1).reshape(-1, 3)
        return coords.to(torch.int32).contiguous()

    def layout(self, stride: int) -> BlockLayout:
        """The canonical layout at `stride`, inserting its coordinate map on first use."""
        if stride not in self._layouts:
            if not self.has_stride(stride):
                raise ValueError(f"stride {stride} does not divide the cell size {self.cell}")
            coords = self.coordinates(stride)
            key, (unique, _) = self.manager.insert_and_map(coords, stride)
            if len(unique) != len(coords) or not torch.equal(unique.cpu(), torch.arange(len(coords))):
                raise RuntimeError("MinkowskiEngine reordered the coordinates of a new map")
            self._layouts[stride] = BlockLayout(self, stride, self.cell // stride, key)
        return self._layouts[stride]

    def layout_of(self, x: ME.SparseTensor) -> BlockLayout | None:
        """The layout whose canonical map `x` lives on, if any."""
        stride = x.tensor_stride[0]
        if not self.has_stride(stride):
            return None
        layout = self.layout(stride)
        return layout if layout.key == x.coordinate_map_key else None

    def canonical_rows(self, coords: Tensor, stride: int) -> Tensor:
        """[N] long: the canonical row of each site given as (batch, y, x) coordinates at `stride`."""
        b = self.cell // stride
        c = coords.long().to(self.cells.device)
        y, x = c[:, 1] // stride, c[:, 2] // stride
        cell = self._ids[c[:, 0], y // b, x // b]
        if bool((cell < 0).any()):
            raise ValueError("sites outside the visible cells of this batch")
        return (cell * b + y % b) * b + x % b

    # -- index tables ---------------------------------------------------------------------------
    def neighbourhood(self, block: int, halo: int) -> Tensor:
        """[n, b+2h, b+2h] rows of the sites around each block (pad row = n*b*b where none)."""
        n, b = self.num_cells, block
        side = b + 2 * halo
        u = torch.arange(-halo, b + halo, device=self.cells.device)
        dc, pos = torch.div(u, b, rounding_mode="floor"), torch.remainder(u, b)  # cell step, position
        cy = self.cells[:, 1, None] + dc  # [n, side]
        cx = self.cells[:, 2, None] + dc
        _, hc, wc = self.active.shape
        inside_y, inside_x = (cy >= 0) & (cy < hc), (cx >= 0) & (cx < wc)
        bidx = self.cells[:, 0].view(n, 1, 1).expand(n, side, side)
        ids = self._ids[bidx, cy.clamp(0, hc - 1)[:, :, None], cx.clamp(0, wc - 1)[:, None, :]]
        ids = torch.where(inside_y[:, :, None] & inside_x[:, None, :], ids, -1)
        rows = (ids * b + pos.view(1, side, 1)) * b + pos.view(1, 1, side)
        return torch.where(ids >= 0, rows, n * b * b)


def attach_geometry(manager: ME.CoordinateManager, geometry: BlockGeometry) -> None:
    setattr(manager, _ATTR, geometry)


def geometry_of_manager(manager: ME.CoordinateManager) -> BlockGeometry | None:
    return getattr(manager, _ATTR, None)


def geometry_of(x: ME.SparseTensor) -> BlockGeometry | None:
    """The block geometry of the batch `x` belongs to (None for tensors not made by `sparsify`)."""
    return geometry_of_manager(x.coordinate_manager)


def layout_of(x: ME.SparseTensor) -> BlockLayout | None:
    """The canonical layout of `x`'s sites, or None if `x` is not on a canonical map."""
    geometry = geometry_of(x)
    return geometry.layout_of(x) if geometry is not None else None
