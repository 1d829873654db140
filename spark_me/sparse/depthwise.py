"""Depthwise convolution without aten's slow CPU backward, and fused over the sparse rows.

Two uses (dataflows.py):

* the ``block`` / ``dense`` dataflows run a depthwise conv on dense maps; aten's forward is fast but
  its CPU weight gradient costs ~10x the forward (oneDNN's depthwise backward-weights), so
  `maps_backward` computes grad-input as a depthwise conv with the flipped kernel (stride 1) or a
  depthwise transposed conv (stride > 1), and grad-weight with the `map_wgrad` reduction kernel;
* the ``fused`` dataflow (`FusedDepthwise`): every output site sums its k*k visible neighbours times
  the per-channel weights straight from the `[N, C]` features through the window index (no
  `[N, k*k, C]` tensor); backward-data is the same gather through the flipped (stride 1) or inverted
  (stride > 1) window table, so no scatter-add; backward-weight a per-channel reduction.

The kernels are C++ (depthwise_kernels.cpp, built by native.py) for float32, float64 and bfloat16
on the CPU. Elsewhere (CUDA, float16, no compiler) every function falls back to a plain torch
definition of the same sum, which is exact but materialises what the kernels avoid (in chunks of
at most 2^24 elements, so that measuring it on a GPU cannot run out of memory).
"""

from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from spark_me.sparse import native

ATEN_BACKWARD_MAX_KERNEL = 3  # measured: benchmarks/README.md, "Fused depthwise"
_SUFFIX = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16"}
_i64, _ptr, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
_SIGNATURES = {
    "gather_sum": [_ptr, _i64, _ptr, _i64, _i64, _ptr, _ptr, _ptr, _i64, _int],
    "gather_wgrad": [_ptr, _i64, _ptr, _i64, _i64, _ptr, _ptr, _i64, _int],
    "map_wgrad": [_ptr, _i64, _i64, _i64, _ptr, _i64, _i64, _i64, _i64, _i64, _ptr, _i64, _int],
}


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = native.load("depthwise_kernels")
    if lib is not None:
        for name, args in _SIGNATURES.items():
            for suffix in _SUFFIX.values():
                fn = getattr(lib, f"spark_dw_{name}_{suffix}")
                fn.argtypes, fn.restype = args, None
    return lib


def native_available() -> bool:
    """Whether the C++ kernels load on this machine (built on first call)."""
    return _library() is not None


def _kernel(name: str, *tensors: Tensor):
    """The C++ function `name` for these tensors' dtype, or None where the torch path must run."""
    t = tensors[0]
    if t.device.type != "cpu" or t.dtype not in _SUFFIX or any(x.dtype != t.dtype for x in tensors[1:]):
        return None
    lib = _library()
    return getattr(lib, f"spark_dw_{name}_{_SUFFIX[t.dtype]}") if lib is not None else None


def _chunk_rows(kk: int, channels: int) -> int:
    """Rows per chunk of the plain torch path, so that its gathered [rows, kk, C] stays <= 2^24
    elements (64 MiB in float32): the tuner measures it on devices without the C++ kernels."""
    return max(1, 2**24 // (kk * channels))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# -- the three sums -------------------------------------------------------------------------------
def gather_sum(x: Tensor, index: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """out[i, c] = bias[c] + sum_j x[index[i, j], c] * weight[j, c]; rows index >= len(x) are absent.

    x [n, C], index [m, kk] long, weight [kk, C], bias [C] -> [m, C].
    """
    n, channels = x.shape
    m, kk = index.shape
    fn = _kernel("gather_sum", x, weight, *([bias] if bias is not None else []))
    if fn is None:
        padded, rows = torch.cat([x, x.new_zeros(1, channels)]), index.clamp(max=n)
        out = torch.cat([(padded[part] * weight).sum(1) for part in rows.split(_chunk_rows(kk, channels))])
        return out + bias if bias is not None else out
    x, index, weight = x.contiguous(), index.contiguous(), weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    out = x.new_empty(m, channels)
    bias_ptr = bias.data_ptr() if bias is not None else None
    threads = torch.get_num_threads()
    fn(
        x.data_ptr(),
        n,
        index.data_ptr(),
        m,
        kk,
        weight.data_ptr(),
        bias_ptr,
        out.data_ptr(),
        channels,
        threads,
    )
    return out


def gather_weight_grad(x: Tensor, index: Tensor, grad: Tensor) -> Tensor:
    """gw[j, c] = sum_i x[index[i, j], c] * grad[i, c]: the weight gradient of `gather_sum`.

    x [n, C], index [m, kk] long, grad [m, C] -> [kk, C] in x's dtype (accumulated in float32 /
    float64).
    """
    n, channels = x.shape
    m, kk = index.shape
    fn = _kernel("gather_wgrad", x, grad)
    if fn is None:
        padded, rows, step = (
            torch.cat([x, x.new_zeros(1, channels)]),
            index.clamp(max=n),
            _chunk_rows(kk, channels),
        )
        out = x.new_zeros(kk, channels)
        for part, g in zip(rows.split(step), grad.split(step), strict=True):
            out += (padded[part] * g[:, None, :]).sum(0)
        return out
    x, index, grad = x.contiguous(), index.contiguous(), grad.contiguous()
    threads = torch.get_num_threads()
    parts = torch.zeros(threads, kk, channels, dtype=_acc_dtype(x.dtype))
    fn(x.data_ptr(), n, index.data_ptr(), m, kk, grad.data_ptr(), parts.data_ptr(), channels, threads)
    return parts.sum(0).to(x.dtype)


def map_weight_grad(x: Tensor, grad: Tensor, kernel_size: int, stride: int, padding: int) -> Tensor:
    """Weight gradient [C, 1, k, k] of `F.conv2d(x, w, stride=stride, padding=padding, groups=C)`.

    x [B, C, H, W], grad [B, C, Ho, Wo] (channels-last memory avoids a copy).
    """
    k, channels = kernel_size, x.shape[1]
    fn = _kernel("map_wgrad", x, grad)
    if fn is None:
        weight = x.new_empty(channels, 1, k, k)
        return torch.ops.aten.convolution_backward(
            grad, x, weight, None, [stride] * 2, [padding] * 2, [1, 1], False, [0, 0], channels,
            [False, True, False],
        )[1]  # fmt: skip
    xs, gs = x.permute(0, 2, 3, 1).contiguous(), grad.permute(0, 2, 3, 1).contiguous()
    (b, h, w, _), (_, ho, wo, _) = xs.shape, gs.shape
    threads = torch.get_num_threads()
    parts = torch.zeros(threads, k, k, channels, dtype=_acc_dtype(x.dtype))
    fn(xs.data_ptr(), b, h, w, gs.data_ptr(), ho, wo, k, stride, padding, parts.data_ptr(), channels, threads)
    return parts.sum(0).permute(2, 0, 1).unsqueeze(1).to(x.dtype)


# -- the block / dense dataflows' backward --------------------------------------------------------
def maps_backward(
    grad: Tensor, g: Tensor, weight: Tensor, stride: int, padding: int, needs: tuple[bool, bool, bool]
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(grad-input, grad-weight, grad-bias) of `F.conv2d(g, weight, bias, stride, padding, groups=C)`.

    grad [B, C, Ho, Wo], g [B, C, H, W], weight [C, 1, k, k]. grad-input is the depthwise conv of
    the gradient with the flipped kernel (stride 1), or the transposed depthwise conv with the
    output padding that restores H x W (stride > 1): both run aten's fast forward kernels.
    Kernels up to 3x3 keep aten's own backward: oneDNN's is fast there (its weight gradient beat
    `map_wgrad` by 10-30 % on EfficientNet-B0's 3x3 layers), slow from 5x5 on (4-30x its forward).
    """
    channels, k = weight.shape[0], weight.shape[-1]
    if k <= ATEN_BACKWARD_MAX_KERNEL:
        return torch.ops.aten.convolution_backward(
            grad, g, weight, [channels] if needs[2] else None, [stride] * 2, [padding] * 2, [1, 1], False,
            [0, 0], channels, list(needs),
        )  # fmt: skip
    grad_g = grad_w = grad_b = None
    if needs[0]:
        if stride == 1 and padding <= k - 1:
            grad_g = F.conv2d(grad, weight.flip(-1, -2), None, 1, k - 1 - padding, 1, channels)
        else:
            extra = [
                size - ((out - 1) * stride - 2 * padding + k)
                for size, out in zip(g.shape[2:], grad.shape[2:], strict=True)
            ]
            grad_g = F.conv_transpose2d(grad, weight, None, stride, padding, extra, channels)
    if needs[1]:
        grad_w = in_layout_of(weight, map_weight_grad(g, grad, k, stride, padding))
    if needs[2]:
        grad_b = grad.sum((0, 2, 3))
    return grad_g, grad_w, grad_b


def in_layout_of(weight: Tensor, grad: Tensor) -> Tensor:
    """`grad` with `weight`'s strides (a copy of these few k*k*C values where they differ), so that
    AccumulateGrad and DDP's gradient buckets take it as it is."""
    return grad if grad.stride() == weight.stride() else torch.empty_like(weight).copy_(grad)


# -- the fused dataflow ---------------------------------------------------------------------------
def inverse_windows(windows: Tensor, rows: int) -> Tensor:
    """[rows, kk]: for input row r and offset j, the output row whose window reads r at j (len(windows)
    where none). At most one exists: a window's offset j sits at a fixed place relative to its output
    site, so distinct outputs read distinct inputs there. Pad entries (>= rows) are dropped.
    """
    m, kk = windows.shape
    table = windows.new_full((rows + 1, kk), m)
    cols = torch.arange(kk, device=windows.device).expand(m, kk)
    outs = torch.arange(m, device=windows.device)[:, None].expand(m, kk)
    table[windows.clamp(max=rows), cols] = outs  # every pad entry lands in the dropped last row
    return table[:rows]


def _as_columns(weight: Tensor) -> Tensor:
    """[C, 1, k, k] -> [k*k, C] (offset-major, the order of the window index)."""
    return weight.reshape(weight.shape[0], -1).t().contiguous()


class FusedDepthwise(torch.autograd.Function):
    """y[i] = bias + sum_j feats[windows[i, j]] * w[j] saving only feats (and the weight)."""

    @staticmethod
    def forward(ctx, feats: Tensor, weight: Tensor, bias: Tensor | None, windows: Tensor, symmetric: bool):
        """feats [N, C]; weight [C, 1, k, k]; windows [M, k*k] (row N = absent); `symmetric`: the
        window table is its own inverse up to flipping the offsets (stride 1, centred odd kernel)."""
        ctx.save_for_backward(feats, weight)
        ctx.windows, ctx.symmetric, ctx.has_bias = windows, symmetric, bias is not None
        return gather_sum(feats, windows, _as_columns(weight), bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        feats, weight = ctx.saved_tensors
        grad, windows = grad.contiguous(), ctx.windows
        grad_feats = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            columns = _as_columns(weight)
            if ctx.symmetric:
                grad_feats = gather_sum(grad, windows, columns.flip(0))
            else:
                grad_feats = gather_sum(grad, inverse_windows(windows, len(feats)), columns)
        if ctx.needs_input_grad[1]:
            grad_w = in_layout_of(weight, gather_weight_grad(feats, windows, grad).t().reshape(weight.shape))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(0)
        return grad_feats, grad_w, grad_b, None, None
