"""Where a spatial map keeps its batch and spatial axes, followed through the shape ops of a forward.

The masked-dense oracle (spark_me.models.masked_dense) must know, for every feature map, which axes
are the batch, the height and the width, whatever the layout (channels-first [B, C, H, W], channels-last
[B, H, W, C] after a permute, a channel shuffle's [B, g, C/g, H, W]). These are pure functions of
shapes and op arguments; any op that would move, cut or merge one of those three axes raises
`Unsupported`, because the oracle has no sparse meaning for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple


class Unsupported(RuntimeError):
    """The masked-dense oracle has no rule for this use of a spatial map (never a silent result)."""


class Axes(NamedTuple):
    """Positions of the batch, height and width axes of a spatial map with `ndim` dimensions."""

    batch: int
    height: int
    width: int
    ndim: int

    @property
    def sites(self) -> tuple[int, int, int]:
        return (self.batch, self.height, self.width)

    def channel_axes(self) -> list[int]:
        return [d for d in range(self.ndim) if d not in self.sites]


CHANNELS_FIRST = Axes(0, 2, 3, 4)


def normalize_dims(dims: int | Sequence[int] | None, ndim: int) -> list[int]:
    """Non-negative axis indices; None or () means every axis (as torch's reductions read them)."""
    if dims is None:
        return list(range(ndim))
    if isinstance(dims, int):
        dims = [dims]
    out = [d % ndim for d in dims]
    return out if out else list(range(ndim))


def require_channel_axis(axes: Axes, dim: int, what: str) -> int:
    d = dim % axes.ndim
    if d in axes.sites:
        raise Unsupported(f"{what} along axis {dim}, a batch or spatial axis of a spatial map {axes}")
    return d


def after_removing(axes: Axes, removed: Sequence[int]) -> Axes:
    """The axes once the (channel) axes `removed` are dropped (a reduction without keepdim, unbind)."""

    def shift(a: int) -> int:
        return a - sum(r < a for r in removed)

    return Axes(shift(axes.batch), shift(axes.height), shift(axes.width), axes.ndim - len(removed))


def after_permute(axes: Axes, order: Sequence[int]) -> Axes:
    order = [d % axes.ndim for d in order]
    if sorted(order) != list(range(axes.ndim)):
        raise Unsupported(f"permute {order} of a {axes.ndim}-d spatial map")
    return Axes(order.index(axes.batch), order.index(axes.height), order.index(axes.width), axes.ndim)


def after_transpose(axes: Axes, dim0: int, dim1: int) -> Axes:
    order = list(range(axes.ndim))
    a, b = dim0 % axes.ndim, dim1 % axes.ndim
    order[a], order[b] = order[b], order[a]
    return after_permute(axes, order)


def after_reshape(axes: Axes, old: Sequence[int], new: Sequence[int]) -> Axes:
    """Axes after a row-major reshape / view / flatten / unflatten / (un)squeeze from `old` to `new`.

    An axis of size n whose preceding axes multiply to P survives unchanged exactly when the new
    shape has an axis of size n whose preceding axes also multiply to P (same index along it for every
    element). The batch, height and width axes must all survive; channel axes may merge or split.
    """

    def prefixes(shape: Sequence[int]) -> list[int]:
        out, p = [], 1
        for n in shape:
            out.append(p)
            p *= n
        return out

    old_p, new_p = prefixes(old), prefixes(new)
    used: list[int] = []
    for a in axes.sites:
        found = [j for j in range(len(new)) if new[j] == old[a] and new_p[j] == old_p[a] and j not in used]
        if not found:
            raise Unsupported(
                f"reshape {tuple(old)} -> {tuple(new)} cuts or merges axis {a} of a spatial map"
            )
        used.append(found[0])
    return Axes(used[0], used[1], used[2], len(new))


def _is_full(index: slice, size: int) -> bool:
    return index.start in (None, 0) and (index.stop is None or index.stop >= size) and index.step in (None, 1)


def after_getitem(axes: Axes, shape: Sequence[int], index: object) -> Axes:
    """Axes after basic indexing; only channel axes may be sliced or picked (ints, slices, ..., None)."""
    entries = list(index) if isinstance(index, tuple) else [index]
    for e in entries:
        if not (e is None or e is Ellipsis or isinstance(e, int | slice)) or isinstance(e, bool):
            raise Unsupported(f"indexing a spatial map with {type(e).__name__}")
    consumed = sum(e is not None and e is not Ellipsis for e in entries)
    if entries.count(Ellipsis) > 1:
        raise Unsupported("indexing with two ellipses")
    if Ellipsis not in entries:
        entries.append(Ellipsis)
    where: dict[int, int] = {}  # old axis -> new axis
    d = o = 0
    for e in entries:
        if e is None:
            o += 1
        elif e is Ellipsis:
            for _ in range(len(shape) - consumed):
                where[d] = o
                d, o = d + 1, o + 1
        elif isinstance(e, int):
            if d in axes.sites:
                raise Unsupported(f"picking one index of batch/spatial axis {d} of a spatial map")
            d += 1
        else:
            if d in axes.sites and not _is_full(e, shape[d]):
                raise Unsupported(f"slicing batch/spatial axis {d} of a spatial map with {e}")
            where[d] = o
            d, o = d + 1, o + 1
    return Axes(where[axes.batch], where[axes.height], where[axes.width], o)
