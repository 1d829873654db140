"""Ops that rearrange a value without computing: permutes, channel cat / split / slices / views,
casts, and the `new_*` factories (which give ordinary dense tensors, e.g. timm's drop-path masks).

The batch and spatial dims are the sites themselves, so only the channel dims can be cut, joined
or reshaped; the one permute allowed swaps channels-first ``[B, C, H, W]`` and channels-last
``[B, H, W, C]`` (ConvNeXt's MLP), which for rows ``[N, C]`` is free.
"""

from __future__ import annotations

import torch
from torch import Tensor

from spark_me.sparse.value import SparseValue, first_value, handles

_TO_LAST, _TO_FIRST = (0, 2, 3, 1), (0, 3, 1, 2)


@handles(Tensor.permute, torch.permute)
def permute(input, *dims):
    x = input
    order = tuple(dims[0]) if len(dims) == 1 and not isinstance(dims[0], int) else tuple(dims)
    order = tuple(d % x.dim() for d in order)
    if x.feats.dim() == 2 and order == (_TO_FIRST if x.channels_last else _TO_LAST):
        return x.with_feats(x.feats, channels_last=not x.channels_last)
    if order == tuple(range(x.dim())):
        return x
    kind = "channels-last" if x.channels_last else "channels-first"
    raise x.context.unsupported(f"permute{order} of a {kind} map (only NCHW <-> NHWC)")


@handles(torch.cat, torch.concat, torch.concatenate)
def cat(tensors, dim: int = 0, *, out=None):
    ref = first_value((tensors,))
    if out is not None or not all(isinstance(t, SparseValue) for t in tensors):
        raise ref.context.unsupported("cat of a sparse map with dense tensors")
    for t in tensors:
        if t.sites.key != ref.sites.key or t.channels_last != ref.channels_last:
            raise ref.context.unsupported("cat of maps on different sites, strides or layouts")
    return ref.with_feats(torch.cat([t.feats for t in tensors], ref.feature_dim(dim, "cat")))


@handles(Tensor.split, torch.split)
def split(input, split_size_or_sections, dim: int = 0):
    x = input
    parts = x.feats.split(split_size_or_sections, x.feature_dim(dim, "split"))
    return tuple(x.with_feats(p) for p in parts)


@handles(Tensor.chunk, torch.chunk)
def chunk(input, chunks: int, dim: int = 0):
    x = input
    return tuple(x.with_feats(p) for p in x.feats.chunk(chunks, x.feature_dim(dim, "chunk")))


@handles(Tensor.__getitem__)
def getitem(input, index):
    """Slices of the channel dims (``x[:, :c]``, ``x[..., :c]`` channels-last); the batch and
    spatial dims must be taken whole."""
    x = input
    index = index if isinstance(index, tuple) else (index,)
    if any(i is Ellipsis for i in index):
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (x.dim() - len(index) + 1) + index[at + 1 :]
    index = index + (slice(None),) * (x.dim() - len(index))
    rows_index: list = [slice(None)]
    for dim, i in enumerate(index):
        whole = isinstance(i, slice) and i == slice(None)
        if dim in x.channel_dims():
            if not isinstance(i, slice | int):
                raise x.context.unsupported(f"indexing channels with {type(i).__name__}")
            rows_index.append(i)
        elif not whole:
            raise x.context.unsupported(f"indexing dim {dim} (batch or spatial) of a sparse map")
    if any(isinstance(i, int) for i in rows_index):
        raise x.context.unsupported("dropping a channel dim by an integer index")
    return x.with_feats(x.feats[tuple(rows_index)])


def _channel_view(x: SparseValue, shape: tuple[int, ...], what: str) -> SparseValue:
    """view / reshape that keeps the batch and spatial dims where they are and regroups channels
    (e.g. a channel shuffle's ``[B, g, C/g, H, W]``)."""
    shape = tuple(shape[0]) if len(shape) == 1 and not isinstance(shape[0], int) else tuple(shape)
    height, width = x.sites.dense_hw
    sizes = tuple(x.shape)
    if x.channels_last:
        keep, channels = shape[:3], shape[3:]
        ok = keep in ((x.batch, height, width), (-1, height, width))
    else:
        keep, channels = shape[:1] + shape[-2:], shape[1:-2]
        ok = keep in ((x.batch, height, width), (-1, height, width)) and len(shape) >= 3
    if not ok:
        raise x.context.unsupported(f"{what}{shape} of a map of shape {sizes} (channels only)")
    return x.with_feats(x.feats.reshape(len(x.feats), *channels))


@handles(Tensor.view, Tensor.reshape, torch.reshape)
def view(input, *shape):
    return _channel_view(input, shape, "view")


@handles(Tensor.transpose, torch.transpose, Tensor.swapaxes, Tensor.swapdims)
def transpose(input, dim0: int, dim1: int):
    x = input
    a, b = x.feature_dim(dim0, "transpose"), x.feature_dim(dim1, "transpose")
    return x.with_feats(x.feats.transpose(a, b))


@handles(Tensor.flatten, torch.flatten)
def flatten(input, start_dim: int = 0, end_dim: int = -1):
    x = input
    start, end = start_dim % x.dim(), end_dim % x.dim()
    channel = x.channel_dims()
    if start == end:
        return x
    if not all(d in channel for d in range(start, end + 1)):
        raise x.context.unsupported(f"flatten({start_dim}, {end_dim}) of a sparse map (channels only)")
    a, b = 1 + channel.index(start), 1 + channel.index(end)
    return x.with_feats(x.feats.flatten(a, b))


@handles(Tensor.contiguous)
def contiguous(input, memory_format=torch.contiguous_format):
    return input.with_feats(input.feats.contiguous())


@handles(Tensor.clone)
def clone(input, *, memory_format=torch.preserve_format):
    return input.with_feats(input.feats.clone())


@handles(Tensor.to)
def to(input, *args, **kwargs):
    """Casts the features; moving a map to another device is refused (its sites live on one)."""
    x = input
    if not isinstance(x, SparseValue):  # `w.to(x)`: a dense tensor takes the map's dtype and device
        plain = [a.feats if isinstance(a, SparseValue) else a for a in args]
        return Tensor.to(x, *plain, **{k: getattr(v, "feats", v) for k, v in kwargs.items()})
    device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
    if device is not None and torch.device(device) != x.feats.device:
        raise x.context.unsupported(f"moving a sparse map to {device}")
    return x if dtype is None or dtype == x.feats.dtype else x.with_feats(x.feats.to(dtype))


@handles(Tensor.type_as)
def type_as(input, other: Tensor):
    """The map cast like `other`; or a dense tensor cast like the map `other` (it stays dense)."""
    if not isinstance(input, SparseValue):
        return Tensor.to(input, other.feats.dtype)
    return input.with_feats(input.feats.to(other.dtype))


def _cast(method: str):
    def handler(input):
        return input.with_feats(getattr(input.feats, method)())

    return handler


for _method in ("float", "double", "half", "bfloat16"):
    handles(getattr(Tensor, _method))(_cast(_method))


def _factory(method: str):
    def handler(input, *args, **kwargs):
        """A dense tensor like the ones torch would make from the map: its dtype and device."""
        with torch._C.DisableTorchFunctionSubclass():
            made = getattr(Tensor, method)(input.feats, *args, **kwargs)
        return made

    return handler


for _method in ("new_empty", "new_zeros", "new_ones", "new_full", "new_tensor"):
    handles(getattr(Tensor, _method))(_factory(_method))
