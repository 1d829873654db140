"""Reductions: over the spatial dims per image (visible sites only), or over the channels per site.

``x.mean((2, 3), keepdim=True)`` (squeeze-excite), GRN's ``x.norm(p=2, dim=(1, 2))``, global pools:
the result is a plain dense tensor ``[B, C, 1, 1]`` (or without the reduced dims), each image's
value computed from its visible sites only (an image with none gives 0). A reduction over the
channel dims stays a sparse value (one value per site). Reducing both, or the batch, is refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from spark_me.sparse.value import SparseValue, handles


def _dims(x: SparseValue, dim) -> tuple[int, ...]:
    if dim is None:
        return tuple(range(x.dim()))
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    return tuple(sorted(d % x.dim() for d in dims))


def _per_image(x: SparseValue, kind: str, keepdim: bool) -> Tensor:
    """[B, *C] sums / means / maxima / L2 norms over each image's visible sites, shaped as torch's
    reduction of the logical map over its spatial dims."""
    images = x.cell_images()  # per cell first (a reduction over b*b sites), then per image
    cells = x.cells()
    out_shape = (x.batch, *cells.shape[2:])
    if kind == "amax":
        out = cells.new_full(out_shape, float("-inf")).index_reduce(0, images, cells.amax(1), "amax")
        out = torch.where(torch.isinf(out), torch.zeros_like(out), out)  # images without sites: 0
    else:
        acc = torch.promote_types(cells.dtype, torch.float32)
        values = cells.to(acc)
        if kind == "norm":
            values = values * values
        out = values.new_zeros(out_shape).index_add(0, images, values.sum(1))
        if kind == "mean":
            per_cell = values.new_full((len(images),), float(cells.shape[1]))
            sites = values.new_zeros(x.batch).index_add_(0, images, per_cell)
            out = out / sites.clamp_min(1).view(-1, *([1] * (out.dim() - 1)))
        elif kind == "norm":  # the subgradient at 0 is 0, as torch's norm backward
            positive = out > 0
            out = torch.where(positive, out, torch.ones_like(out)).sqrt() * positive
        out = out.to(cells.dtype)
    hdim, wdim = x.spatial_dims()
    if keepdim:
        out = out.unsqueeze(1).unsqueeze(1).movedim((1, 2), (hdim, wdim))
    return out


def _reduce(kind: str, torch_name: str):
    def handler(input, dim=None, keepdim: bool = False, *args, **kwargs):
        x = input
        if args or {k: v for k, v in kwargs.items() if v is not None and k not in ("dtype",)}:
            raise x.context.unsupported(f"{torch_name} with extra arguments {args} {kwargs}")
        dims = _dims(x, dim)
        if kwargs.get("dtype") is not None:  # torch casts the input first, then reduces
            x = x.with_feats(x.feats.to(kwargs["dtype"]))
        if dims == tuple(sorted(x.spatial_dims())):
            return _per_image(x, kind, keepdim)
        channel = tuple(d for d in x.channel_dims())
        if dims and set(dims) <= set(channel):
            feat_dims = tuple(1 + channel.index(d) for d in dims)
            rows = x.feats
            if kind == "norm":
                out = torch.linalg.vector_norm(rows, 2, feat_dims, keepdim)
            else:
                out = getattr(rows, kind)(feat_dims, keepdim=keepdim)
            return x.with_feats(out)
        raise x.context.unsupported(f"{torch_name} over dims {dims} of a map of shape {tuple(x.shape)}")

    return handler


for _kind, _names in (("mean", ("mean",)), ("sum", ("sum",)), ("amax", ("amax",))):
    for _name in _names:
        handles(getattr(torch, _name), getattr(Tensor, _name))(_reduce(_kind, _name))


@handles(Tensor.norm, torch.norm)
def norm(input, p="fro", dim=None, keepdim: bool = False, dtype=None):
    x = input
    if p not in (2, 2.0, "fro") or dtype is not None:
        raise x.context.unsupported(f"norm(p={p!r})")
    return _reduce("norm", "norm")(x, dim, keepdim)


@handles(torch.linalg.vector_norm)
def vector_norm(input, ord=2, dim=None, keepdim: bool = False, *, dtype=None, out=None):
    if ord not in (2, 2.0) or dtype is not None or out is not None:
        raise input.context.unsupported(f"vector_norm(ord={ord!r})")
    return _reduce("norm", "vector_norm")(input, dim, keepdim)


def _global(kind: str, name: str):
    def handler(input, output_size, *args, **kwargs):
        x = input
        size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
        if size != (1, 1) or x.channels_last or args or kwargs.get("return_indices"):
            raise x.context.unsupported(f"{name} to {output_size} (global pooling to 1x1 only)")
        return _per_image(x, kind, keepdim=True)

    return handler


handles(F.adaptive_avg_pool2d)(_global("mean", "adaptive_avg_pool2d"))
handles(F.adaptive_max_pool2d)(_global("amax", "adaptive_max_pool2d"))
