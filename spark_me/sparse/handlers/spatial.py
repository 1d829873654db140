"""Convolutions, pools and nearest upsampling: the ops that read neighbouring sites.

Each becomes a `SparseOp` computed by one of the engine's dataflows (chosen by the context's tuner)
on the value's block layout, so a conv of any model runs through the same kernels as the
hand-written encoders. Windows must be *aligned* with the stride grid, which is what keeps the
visible sites of every stride whole cells: odd kernels centred (padding k // 2), even kernels equal
to their stride (padding 0, patchify). Any other padding, dilation, or a window that changes the
map's size otherwise is refused with the reason, never computed differently from the dense model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from spark_me.sparse import dataflows
from spark_me.sparse.ops import SparseOp
from spark_me.sparse.tuner import rule_for
from spark_me.sparse.value import SparseValue, first_value, handles


def _pair(v, what: str, x: SparseValue) -> int:
    """An int or a pair of equal ints -> the int (the engine's windows are square)."""
    if isinstance(v, str):
        raise x.context.unsupported(f"{what}={v!r}")
    a, b = (v, v) if isinstance(v, int) else tuple(v)
    if a != b:
        raise x.context.unsupported(f"a non-square {what} {tuple(v)}")
    return int(a)


def _check_window(x: SparseValue, what: str, k: int, s: int, p: int, ceil_mode: bool = False) -> None:
    """Refuse windows that do not map the sites of stride `x.site_stride` onto whole cells of the output,
    and maps that are not [B, C, H, W] (torch's 2-d windows read dims 1, 2, 3 as C, H, W)."""
    if x.channels_last or x.feats.dim() != 2:
        raise x.context.unsupported(f"{what} on a map of shape {tuple(x.shape)} (channels-first 4-d only)")
    aligned = p == k // 2 if k % 2 else (p == 0 and k == s)
    if not aligned:
        raise x.context.unsupported(
            f"{what} with kernel {k}, stride {s}, padding {p} (aligned windows only: odd kernels with "
            "padding k//2, or even kernels equal to the stride with padding 0)"
        )
    height, width = x.sites.dense_hw
    for size in (height, width):
        out = (size + 2 * p - k + (s - 1 if ceil_mode else 0)) // s + 1
        if ceil_mode and (out - 1) * s >= size + p:
            out -= 1
        if out * s != size:
            raise x.context.unsupported(f"{what} whose output size {out} is not {size}/{s}")
    if not x.sites.geometry.has_stride(x.site_stride * s):
        raise x.context.unsupported(f"{what} reaching stride {x.site_stride * s} (beyond the mask cell)")


class _Owned(torch.autograd.Function):
    """Identity handing back a dataflow's output rows as a tensor of their own, not a view.

    The block dataflow's custom Function returns its NCHW result viewed as rows [N, C]; torch forbids
    in-place ops on a view made inside a custom Function, while a model may well do
    ``conv(x).relu_()`` (the in-place handlers run torch's own in-place op on the rows, so that
    every alias sees it). The rows are re-wrapped over the same memory, no copy; nothing else holds
    the view, and the dataflow saves only its input and weight, so no saved tensor is overwritten."""

    @staticmethod
    def forward(ctx, rows: Tensor) -> Tensor:
        return rows.new_empty(0).set_(
            rows.untyped_storage(), rows.storage_offset(), rows.shape, rows.stride()
        )

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


def run_op(x: SparseValue, op: SparseOp, weight: Tensor | None, bias: Tensor | None) -> SparseValue:
    """`op` on `x` through the dataflow the context's tuner picks (the rule table without one)."""
    sparse = x.to_sparse_tensor()
    context = x.context
    if context.tuner is not None:
        name = context.tuner.choose(op, sparse, weight, bias)
    else:
        name = rule_for(op, sparse)
    context.dataflows.append((context.where(), repr(op), name))
    feats, _ = dataflows.run(name, op, sparse, weight, bias)
    if feats._is_view():
        feats = _Owned.apply(feats)
    return x.with_feats(feats, layout=x.sites.geometry.layout(x.site_stride * op.stride))


@handles(F.conv2d)
def conv2d(input, weight: Tensor, bias=None, stride=1, padding=0, dilation=1, groups: int = 1):
    x = input
    if not isinstance(x, SparseValue) or isinstance(weight, SparseValue):
        raise first_value((input, weight)).context.unsupported("a convolution whose weight is a sparse map")
    if _pair(dilation, "dilation", x) != 1:
        raise x.context.unsupported("a dilated convolution")
    k, s = _pair(tuple(weight.shape[-2:]), "kernel", x), _pair(stride, "stride", x)
    if padding in ("same", "valid"):  # torch allows "same" at stride 1 only
        padding = k // 2 if padding == "same" and k % 2 else 0
    p = _pair(padding, "padding", x)
    out_channels, in_channels = weight.shape[0], weight.shape[1] * groups
    if x.feats.dim() != 2 or x.feats.shape[1] != in_channels:
        raise x.context.unsupported(f"a conv for {in_channels} channels on a map of shape {tuple(x.shape)}")
    if x.channels_last:
        raise x.context.unsupported(f"conv2d on a channels-last map of shape {tuple(x.shape)}")
    if k == 1 and s == 1 and p == 0 and groups == 1:  # pointwise: a GEMM on the rows
        x.context.dataflows.append((x.context.where(), f"conv1x1 {in_channels}->{out_channels}", "pointwise"))
        return x.with_feats(F.linear(x.feats, weight.reshape(out_channels, in_channels), bias))
    _check_window(x, "conv2d", k, s, p)
    depthwise = groups > 1 and groups == in_channels == out_channels
    kind = "depthwise" if depthwise else "conv"
    op = SparseOp(kind, k, s, in_channels, out_channels, groups=1 if depthwise else groups)
    return run_op(x, op, weight, bias)


@handles(F.max_pool2d)
def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    x = input
    if return_indices or _pair(dilation, "dilation", x) != 1:
        raise x.context.unsupported("max_pool2d with indices or dilation")
    k = _pair(kernel_size, "kernel", x)
    s = k if stride is None or stride == [] else _pair(stride, "stride", x)
    p = _pair(padding, "padding", x)
    _check_window(x, "max_pool2d", k, s, p, ceil_mode)
    channels = x.feats.shape[1]
    return run_op(x, SparseOp("maxpool", k, s, channels, channels), None, None)


@handles(F.avg_pool2d)
def avg_pool2d(
    input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None
):
    x = input
    if divisor_override is not None:
        raise x.context.unsupported("avg_pool2d with divisor_override")
    k = _pair(kernel_size, "kernel", x)
    s = k if stride is None or stride == [] else _pair(stride, "stride", x)
    p = _pair(padding, "padding", x)
    _check_window(x, "avg_pool2d", k, s, p, ceil_mode)
    if k == 1 and s == 1:  # a new tensor, as torch's (an in-place op on it must not change x)
        return x.with_feats(x.feats.clone())
    channels = x.feats.shape[1]
    op = SparseOp("avgpool", k, s, channels, channels, count_include_pad=bool(count_include_pad))
    return run_op(x, op, None, None)


@handles(F.interpolate)
def interpolate(
    input, size=None, scale_factor=None, mode="nearest", align_corners=None, recompute_scale_factor=None,
    antialias=False,
):  # fmt: skip
    """Nearest upsampling by an integer factor f: each site at stride s/f copies its parent at s."""
    x = input
    if mode != "nearest" or x.channels_last or x.feats.dim() != 2:
        raise x.context.unsupported(
            f"interpolate(mode={mode!r}) of a map of shape {tuple(x.shape)} (nearest, channels-first only)"
        )
    height, width = x.sites.dense_hw
    if size is not None:
        out_h, out_w = (size, size) if isinstance(size, int) else tuple(size)
        factor = out_h // height if out_h % height == 0 and out_h * width == out_w * height else 0
    else:
        f = scale_factor if isinstance(scale_factor, int | float) else scale_factor[0]
        pair = (scale_factor, scale_factor) if isinstance(scale_factor, int | float) else scale_factor
        factor = int(f) if float(f).is_integer() and pair[0] == pair[1] else 0
    if factor < 1 or x.site_stride % factor:
        raise x.context.unsupported(
            f"interpolate from stride {x.site_stride} by size={size} scale={scale_factor}"
        )
    if factor == 1:  # a new tensor, as torch's (an in-place op on it must not change x)
        return x.with_feats(x.feats.clone())
    src = x.sites
    dst = src.geometry.layout(src.stride // factor)
    b, big = src.block, dst.block
    pos = torch.arange(big, device=x.feats.device) // factor
    within = (pos.view(big, 1) * b + pos.view(1, big)).reshape(-1)  # [big*big]: parent within a cell
    cells = torch.arange(src.num_cells, device=x.feats.device).view(-1, 1) * (b * b)
    parents = (cells + within).reshape(-1)
    return x.with_feats(x.feats.index_select(0, parents), layout=dst)
