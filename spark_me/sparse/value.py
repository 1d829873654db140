"""`SparseValue`: a sparse feature map that looks like a dense tensor to a model's own code.

A CNN written for dense tensors (a timm model, a user's `nn.Module`) runs unchanged on the visible
sites when its input is a `SparseValue`: every torch function the model calls on it is routed, by
`__torch_function__`, to a small handler (spark_me/sparse/handlers/) that computes the op on the
visible sites only. The value holds

* ``feats``: the features of the visible sites, ``[N, *channels]`` (rows block-major, see
  geometry.py), a plain autograd tensor, so the backward is ordinary autograd over the handlers;
* ``sites``: the `BlockLayout` of its stride (the coordinate map in MinkowskiEngine's manager, the
  index tables the dataflows gather through);
* ``channels_last``: whether the model sees it as ``[B, C, H, W]`` or, after a permute, as
  ``[B, H, W, C]``;
* ``context``: the per-forward `ExecutionContext` (the dataflow tuner, BatchNorm synchronisation,
  the module path for error messages), an explicit object rather than module state.

The value itself carries no data (a wrapper subclass): its shape, dtype and device are metadata,
so `x.shape`, `x.dim()`, `x.dtype` work as the model expects; an op without a handler raises
`UnsupportedOp` naming the op and the module, never computing a dense result by accident.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import MinkowskiEngine as ME
from torch import Tensor

from spark_me.sparse.geometry import BlockLayout
from spark_me.sparse.tuner import DataflowTuner


class UnsupportedOp(ValueError):
    """A torch op that has no sparse semantics here (or not with these arguments)."""


@dataclass
class ExecutionContext:
    """What the handlers of one encoder forward share: how to choose dataflows, how to normalise.

    tuner: the encoder's `DataflowTuner` (None: the rule table). sync_group: False for local
    BatchNorm statistics, else the process group (None = world) whose visible sites they span.
    path: the stack of module names being run (kept by the encoder's hooks), for error messages
    and the per-layer dataflow table. model: the model's name, for error messages.
    """

    tuner: DataflowTuner | None = None
    sync_group: Any = False
    model: str = "model"
    path: list[str] = field(default_factory=list)
    dataflows: list[tuple[str, str, str]] = field(default_factory=list)

    def where(self) -> str:
        return self.path[-1] if self.path else "<top level>"

    def unsupported(self, what: str) -> UnsupportedOp:
        return UnsupportedOp(f"{self.model}: {what} (in module '{self.where()}') has no sparse form")


# torch function -> handler(*args, **kwargs); filled by the modules of spark_me.sparse.handlers.
HANDLERS: dict[Callable, Callable] = {}


def handles(*funcs: Callable) -> Callable[[Callable], Callable]:
    """Register the decorated function as the sparse handler of each torch function in `funcs`."""

    def register(handler: Callable) -> Callable:
        for func in funcs:
            if func in HANDLERS:
                raise ValueError(f"two sparse handlers for {op_name(func)}")
            HANDLERS[func] = handler
        return handler

    return register


def op_name(func: Callable) -> str:
    """A readable name of a torch function, e.g. 'torch.Tensor.unfold' or 'F.pad'."""
    owner = getattr(func, "__objclass__", None) or getattr(func, "__self__", None)
    module = getattr(func, "__module__", None) or ""
    name = getattr(func, "__name__", None) or repr(func)
    if isinstance(owner, type):
        return f"torch.Tensor.{name}"
    if module.startswith("torch.nn.functional"):
        return f"F.{name}"
    return f"torch.{name}"


class SparseValue(Tensor):
    """Visible sites of a feature map at one stride, seen as a dense ``[B, C, H, W]`` tensor."""

    feats: Tensor
    sites: BlockLayout
    channels_last: bool
    context: ExecutionContext

    @staticmethod
    def __new__(cls, feats: Tensor, layout: BlockLayout, channels_last: bool, context: ExecutionContext):
        batch = layout.geometry.active.shape[0]
        height, width = layout.dense_hw
        channels = tuple(feats.shape[1:])
        shape = (batch, height, width, *channels) if channels_last else (batch, *channels, height, width)
        return Tensor._make_wrapper_subclass(cls, shape, dtype=feats.dtype, device=feats.device)

    def __init__(self, feats: Tensor, layout: BlockLayout, channels_last: bool, context: ExecutionContext):
        if feats.shape[0] != layout.num_sites:
            raise ValueError(f"{feats.shape[0]} feature rows for a layout of {layout.num_sites} sites")
        self.feats, self.sites, self.channels_last, self.context = feats, layout, channels_last, context

    # -- construction -------------------------------------------------------------------------
    def with_feats(
        self, feats: Tensor, layout: BlockLayout | None = None, channels_last: bool | None = None
    ) -> SparseValue:
        """A value with new features, on this value's sites unless `layout` says otherwise."""
        return SparseValue(
            feats,
            self.sites if layout is None else layout,
            self.channels_last if channels_last is None else channels_last,
            self.context,
        )

    def to_sparse_tensor(self) -> ME.SparseTensor:
        """The features as an `ME.SparseTensor` [N, C] on the layout's coordinate map."""
        return ME.SparseTensor(
            self.feats.reshape(len(self.feats), -1),
            coordinate_map_key=self.sites.key,
            coordinate_manager=self.sites.geometry.manager,
        )

    # -- geometry -----------------------------------------------------------------------------
    @property
    def site_stride(self) -> int:
        return self.sites.stride

    @property
    def batch(self) -> int:
        return self.sites.geometry.active.shape[0]

    def cells(self) -> Tensor:
        """The features as ``[n_cells, b*b, *C]``: the sites of each visible cell (a view).
        Per-image operands index the n_cells rows, not the N sites: b*b times less gather and
        scatter traffic (64x at stride 4)."""
        # splitting dim 0 is always a view, whatever the strides: in-place ops on it reach `feats`
        return self.feats.view(self.sites.num_cells, self.sites.block**2, *self.feats.shape[1:])

    def cell_images(self) -> Tensor:
        """[n_cells] long: the image of each visible cell (non-decreasing: cells are in image order)."""
        return self.sites.geometry.cells[:, 0]

    def from_cells(self, cells: Tensor) -> Tensor:
        """``[n_cells, b*b, *C]`` -> rows ``[N, *C]``."""
        return cells.reshape(len(self.feats), *cells.shape[2:])

    def spatial_dims(self) -> tuple[int, int]:
        """The (H, W) dims of the logical shape."""
        return (1, 2) if self.channels_last else (self.dim() - 2, self.dim() - 1)

    def channel_dims(self) -> tuple[int, ...]:
        """The channel dims of the logical shape (one, or several after a channel `view`)."""
        spatial = self.spatial_dims()
        return tuple(d for d in range(1, self.dim()) if d not in spatial)

    def feature_dim(self, dim: int, what: str) -> int:
        """The dim of `feats` (1..) holding the logical channel dim `dim`; any other dim is refused."""
        dim %= self.dim()
        channel = self.channel_dims()
        if dim not in channel:
            raise self.context.unsupported(
                f"{what} along dim {dim} of a map of shape {tuple(self.shape)} (channels only)"
            )
        return 1 + channel.index(dim)

    # -- dispatch -----------------------------------------------------------------------------
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        handler = HANDLERS.get(func)
        if handler is None:
            raise first_value(args, kwargs).context.unsupported(op_name(func))
        return handler(*args, **(kwargs or {}))

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # Every op is answered in __torch_function__ above; reaching aten means an op slipped past.
        raise UnsupportedOp(f"aten op {func} reached a sparse value")

    def __repr__(self, *, tensor_contents=None) -> str:  # no data to print
        kind = "channels-last" if self.channels_last else "channels-first"
        shape, sites = tuple(self.shape), len(self.feats)
        return f"SparseValue(shape={shape}, stride={self.site_stride}, sites={sites}, {kind})"


def first_value(args, kwargs=None) -> SparseValue:
    """The first `SparseValue` among the arguments (lists included): the reference for broadcasts."""
    for a in (*args, *(kwargs or {}).values()):
        if isinstance(a, SparseValue):
            return a
        if isinstance(a, list | tuple):
            for b in a:
                if isinstance(b, SparseValue):
                    return b
    raise TypeError("no sparse value among the arguments")
