"""How a sparse op is computed: interchangeable dataflows over the block layout (see geometry.py).

A layer says *what* it computes (a `SparseOp`: conv, depthwise conv or max-pool with its kernel,
stride and widths); a dataflow says *how*; the tuner (tuner.py) picks a dataflow per op. Every
dataflow returns the output features `[N_out, C_out]` in the canonical block-major order of the
output stride, so dataflows can be mixed freely from layer to layer.

- ``block``: gather every visible cell's block grown by a halo of k//2 sites (zeros, or -inf for
  max-pool, where the neighbour cell is masked) into a batch of small dense images and run one dense
  kernel with padding 0 (SBNet's idea). With block-major rows and no halo (ConvNeXt's k == stride
  "patchify" convs, ResNet's 1x1 strided shortcut) the gather is a free view. Best when blocks are
  large (strides 4-8): the halo costs (b+2h)^2 / b^2.
- ``dense``: scatter the sites into a zero map, run the dense kernel over the whole map, gather the
  output sites. Costs what masked-dense costs for that layer; best on the small stride-16/32 maps
  where a halo would cost 4-9x.
- ``gemm``: one gather of all k*k neighbours of every output site (the kernel map, read from the
  same halo index) and one GEMM; exact work, gather traffic k*k*C per site.
- ``fused`` (depthwise only): every output site sums its k*k visible neighbours times the
  per-channel weights straight from the `[N, C]` features through the window index, without
  materialising `[N, k*k, C]` (C++ kernels, depthwise.py); backward-data through the flipped or
  inverted window table (a gather), backward-weight a per-channel reduction. Exact work, like
  ``gemm``, without its gather traffic; offered where the C++ kernels build.
- ``me``: MinkowskiEngine's own function, the reference; float32/float64 only, so it runs in
  float32 under autocast. Its strided outputs come back in hash order and are put in canonical order.

All dataflows but ``me`` are plain torch: they run in float64 (tests), float32, and in bf16/fp16
under autocast, on any device.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import MinkowskiEngine as ME
import torch
import torch.nn.functional as F
from torch import Tensor

from spark_me.sparse import depthwise
from spark_me.sparse.bn_relu import BatchNormReLU, Prologue, op_input, prologue_backward
from spark_me.sparse.geometry import BlockLayout, geometry_of
from spark_me.sparse.me_dataflow import me
from spark_me.sparse.ops import SparseOp, compute_dtype

__all__ = ["DATAFLOWS", "SparseOp", "candidates", "compute_dtype", "run"]


def _padded(feats: Tensor, fill: float) -> Tensor:
    """[N+1, C]: the features and the pad row that masked neighbours point at."""
    return torch.cat([feats, feats.new_full((1, feats.shape[1]), fill)])


def _scatter_rows(grad: Tensor, index: Tensor, rows: int) -> Tensor:
    """Backward of `_padded(x).index_select(0, index)`: sum the gradients into [rows, C]."""
    out = grad.new_zeros(rows + 1, grad.shape[-1])
    return out.index_add_(0, index.reshape(-1), grad.reshape(-1, grad.shape[-1]))[:rows]


def _as_rows(y: Tensor) -> Tensor:
    """NCHW (ideally channels-last) -> [N*H*W, C] in (n, y, x) order."""
    return y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])


def _as_maps(rows: Tensor, n: int, side: int) -> Tensor:
    """[n*side*side, C] -> NCHW view [n, C, side, side] (channels-last memory)."""
    return rows.view(n, side, side, rows.shape[-1]).permute(0, 3, 1, 2)


class _Flow:
    """A dataflow as gather -> dense kernel, each with its backward.

    `_Gathered` runs it saving only the input features and the weight: the gathered tensor (blocks
    with halos, a densified map, k*k columns) is rebuilt in backward, which is cheap next to the
    kernel and keeps the memory of every layer at O(N*C) like the features themselves.
    """

    def __init__(self, op: SparseOp, src: BlockLayout, dst: BlockLayout):
        self.op, self.src, self.dst = op, src, dst

    def gather(self, feats: Tensor) -> Tensor:
        raise NotImplementedError

    def gather_backward(self, grad: Tensor, rows: int) -> Tensor:
        raise NotImplementedError

    def kernel(self, g: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        raise NotImplementedError

    def kernel_backward(self, grad: Tensor, g: Tensor, weight: Tensor, needs: tuple[bool, bool, bool]):
        raise NotImplementedError


class _ConvKernel(_Flow):
    """The dense kernel is `F.conv2d` (or `F.max_pool2d`) over NCHW maps; a conv's backward is aten's
    convolution_backward, a depthwise conv's `depthwise.maps_backward` (aten's CPU depthwise weight
    gradient costs ~10x its forward); max-pool, weightless, runs on plain autograd."""

    padding = 0

    def source_rows(self, rows: int) -> Tensor:
        """[maps, H*W] long: the input row at every position of the gathered maps (`rows`, the pad
        row, where a masked or out-of-image site is)."""
        raise NotImplementedError

    def output_rows(self, maps: Tensor) -> Tensor:
        """The output sites' rows [N_out, C] of the kernel's output maps [maps, C, h, w]."""
        raise NotImplementedError

    def kernel(self, g: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        op = self.op
        if op.kind == "maxpool":
            return self.output_rows(F.max_pool2d(g, op.kernel_size, op.stride, self.padding))
        if op.kind == "avgpool":
            return self.output_rows(
                F.avg_pool2d(
                    g, op.kernel_size, op.stride, self.padding, count_include_pad=op.count_include_pad
                )
            )
        return self.output_rows(F.conv2d(g, weight, bias, op.stride, self.padding, 1, op.groups))

    def max_pool_argmax(self, g: Tensor, rows: int) -> tuple[Tensor, Tensor]:
        """Max-pool of the gathered maps `g`: (output rows [N_out, C], where each value came from as
        a flat index row * C + channel into the input [rows, C] (int32 when it fits))."""
        op = self.op
        out, where = F.max_pool2d(g, op.kernel_size, op.stride, self.padding, return_indices=True)
        maps, channels = where.shape[:2]
        source = self.source_rows(rows).view(maps, 1, -1).expand(maps, channels, -1)
        row = torch.gather(source, 2, where.view(maps, channels, -1)).view_as(where)
        channel = torch.arange(channels, device=row.device).view(1, channels, 1, 1)
        flat = self.output_rows(row * channels + channel)
        small = (rows + 1) * channels < 2**31
        return self.output_rows(out), (flat.to(torch.int32) if small else flat).contiguous()

    def kernel_maps_backward(self, grad: Tensor, g: Tensor, weight: Tensor, needs) -> tuple:
        if self.op.kind == "depthwise":
            return depthwise.maps_backward(grad, g, weight, self.op.stride, self.padding, needs)
        if self.op.kernel_size == 1 and self.op.stride > 1 and self.op.groups == 1:
            return _strided_pointwise_backward(grad, g, weight, self.op.stride, needs)
        return torch.ops.aten.convolution_backward(
            grad, g, weight, [weight.shape[0]] if needs[2] else None, [self.op.stride] * 2,
            [self.padding] * 2, [1, 1], False, [0, 0], self.op.groups, list(needs),
        )  # fmt: skip


def _strided_pointwise_backward(grad: Tensor, g: Tensor, weight: Tensor, stride: int, needs) -> tuple:
    """Backward of a 1x1 conv with stride s > 1 as GEMMs on the sampled sites (every s-th row and
    column): grad-input is grad @ W there and 0 elsewhere, grad-weight grad^T @ sampled input.

    Why not aten: torch 2.14's CPU convolution_backward for this case, on a channels-last input with
    2+ threads, corrupts the heap for some small widths (8 or 12 channels, 16-site blocks: "free():
    invalid next size", reproduced in float32 and bf16 outside spark-me); the GEMMs are exact.
    """
    out_ch, in_ch = weight.shape[:2]
    w = weight.reshape(out_ch, in_ch)
    rows = grad.permute(0, 2, 3, 1).reshape(-1, out_ch)  # [n*ho*wo, O]
    grad_g = grad_w = None
    if needs[0]:
        grad_g = torch.zeros_like(g, memory_format=torch.channels_last)
        sampled = (rows @ w).view(grad.shape[0], grad.shape[2], grad.shape[3], in_ch).permute(0, 3, 1, 2)
        grad_g[:, :, ::stride, ::stride] = sampled
    if needs[1]:
        x = g[:, :, ::stride, ::stride].permute(0, 2, 3, 1).reshape(-1, in_ch)
        grad_w = (rows.t() @ x).as_strided(weight.shape, weight.stride())  # the weight's own strides
    return grad_g, grad_w, rows.sum(0) if needs[2] else None


class _Block(_ConvKernel):
    """Visible cells as a batch of (b+2h)^2 images; conv with padding 0."""

    def gather(self, feats: Tensor) -> Tensor:
        src, h = self.src, self.op.halo
        if h == 0:
            return _as_maps(feats, src.num_cells, src.block)
        index = src.halo_index(h)
        rows = _padded(feats, self.op.fill).index_select(0, index.view(-1))
        return _as_maps(rows, src.num_cells, index.shape[1])

    def gather_backward(self, grad: Tensor, rows: int) -> Tensor:
        grad = grad.permute(0, 2, 3, 1)
        if self.op.halo == 0:
            return grad.reshape(rows, -1)
        return _scatter_rows(grad, self.src.halo_index(self.op.halo), rows)

    def source_rows(self, rows: int) -> Tensor:
        if self.op.halo == 0:
            return torch.arange(rows, device=self.src.geometry.cells.device).view(self.src.num_cells, -1)
        return self.src.halo_index(self.op.halo).view(self.src.num_cells, -1)

    def output_rows(self, maps: Tensor) -> Tensor:
        return _as_rows(maps)

    def kernel_backward(self, grad: Tensor, g: Tensor, weight: Tensor, needs):
        return self.kernel_maps_backward(_as_maps(grad, self.dst.num_cells, self.dst.block), g, weight, needs)


class _Dense(_ConvKernel):
    """Sites scattered into the zero-filled map; conv with padding k//2; output sites gathered."""

    @property
    def padding(self) -> int:  # type: ignore[override]
        return self.op.halo

    def _map(self, layout: BlockLayout, rows: Tensor, fill: float = 0.0) -> Tensor:
        batch = layout.geometry.active.shape[0]
        height, width = layout.dense_hw
        canvas = rows.new_full((batch * height * width, rows.shape[1]), fill)
        canvas.index_copy_(0, layout.dense_index(), rows)  # in place: the canvas is ours (no 2nd copy)
        return canvas.view(batch, height, width, -1).permute(0, 3, 1, 2)

    def gather(self, feats: Tensor) -> Tensor:
        return self._map(self.src, feats, self.op.fill)

    def gather_backward(self, grad: Tensor, rows: int) -> Tensor:
        return _as_rows(grad).index_select(0, self.src.dense_index())

    def source_rows(self, rows: int) -> Tensor:
        index = self.src.dense_index()
        source = index.new_full((self.src.geometry.active.shape[0], math.prod(self.src.dense_hw)), rows)
        return source.view(-1).index_copy_(0, index, torch.arange(rows, device=index.device)).view_as(source)

    def output_rows(self, maps: Tensor) -> Tensor:
        return _as_rows(maps).index_select(0, self.dst.dense_index())

    def kernel_backward(self, grad: Tensor, g: Tensor, weight: Tensor, needs):
        return self.kernel_maps_backward(self._map(self.dst, grad), g, weight, needs)


class _Pointwise(_Flow):
    """A 1x1 / stride-1 conv: one GEMM on the features themselves (no gather)."""

    def gather(self, feats: Tensor) -> Tensor:
        return feats

    def gather_backward(self, grad: Tensor, rows: int) -> Tensor:
        return grad

    def kernel(self, g: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(g, weight.view(weight.shape[0], -1), bias)

    def kernel_backward(self, grad: Tensor, g: Tensor, weight: Tensor, needs):
        w = weight.view(weight.shape[0], -1)
        grad_g = grad @ w if needs[0] else None
        # in the weight's own strides (a 1x1 channels-last weight), so AccumulateGrad and DDP's
        # buckets take it without a copy
        grad_w = (grad.t() @ g).as_strided(weight.shape, weight.stride()) if needs[1] else None
        return grad_g, grad_w, grad.sum(0) if needs[2] else None


class _Gemm(_Flow):
    """All k*k neighbours of every output site as one [N_out, k*k*C] matrix; one GEMM."""

    def _windows(self) -> Tensor:
        return self.src.window_index(self.op.halo, self.op.kernel_size, self.op.stride)

    def gather(self, feats: Tensor) -> Tensor:
        windows = self._windows()
        return _padded(feats, 0.0).index_select(0, windows.view(-1)).view(len(windows), -1)

    def gather_backward(self, grad: Tensor, rows: int) -> Tensor:
        return _scatter_rows(grad.view(-1, self.op.in_channels), self._windows(), rows)

    @staticmethod
    def _matrix(weight: Tensor) -> Tensor:
        """[out, in, k, k] -> [k*k*in, out] in the columns' (ky, kx, c) order (a free view of a
        channels-last weight, as `SparseConv2d` keeps it; a copy of an NCHW one)."""
        return weight.permute(2, 3, 1, 0).reshape(-1, weight.shape[0])

    def kernel(self, g: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        y = g @ self._matrix(weight)
        return y + bias if bias is not None else y

    def kernel_backward(self, grad: Tensor, g: Tensor, weight: Tensor, needs):
        grad_g = grad @ self._matrix(weight).t() if needs[0] else None
        grad_w = None
        if needs[1]:
            k = self.op.kernel_size
            # [out, k*k*in] viewed as [out, k, k, in] -> [out, in, k, k] is channels-last: the
            # weight's own layout, so AccumulateGrad takes it without a copy
            grad_w = (grad.t() @ g).view(-1, k, k, self.op.in_channels).permute(0, 3, 1, 2)
        return grad_g, grad_w, grad.sum(0) if needs[2] else None


class _Gathered(torch.autograd.Function):
    """y = kernel(gather(x)) saving only the features and the weight; the gather is redone in
    backward. x is `feats`, or with a prologue (bn_relu.py) relu(bn(feats)): given for the forward,
    remade in backward, never saved; the backward then returns the BN's gradients too."""

    @staticmethod
    def forward(ctx, feats, weight, bias, flow: _Flow, bn_weight=None, bn_bias=None, p=None, dtype=None):
        ctx.save_for_backward(feats, weight)
        ctx.flow, ctx.has_bias, ctx.dtype = flow, bias is not None, dtype or feats.dtype
        ctx.p = p._replace(first=None) if p is not None else None
        return flow.kernel(flow.gather(op_input(feats, p, ctx.dtype)), weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        feats, weight = ctx.saved_tensors
        flow, wants, p = ctx.flow, ctx.needs_input_grad, ctx.p
        x = op_input(feats, p, ctx.dtype)
        needs = (wants[0] or any(wants[4:6]), wants[1], ctx.has_bias and wants[2])
        grad_g, grad_w, grad_b = flow.kernel_backward(grad.contiguous(), flow.gather(x), weight, needs)
        grad_x = flow.gather_backward(grad_g, len(x)) if needs[0] else None
        if p is None or grad_x is None:
            return grad_x, grad_w, grad_b, None, None, None, None, None
        return grad_x_to_feats(grad_x, x, feats, p, grad_w, grad_b)


def grad_x_to_feats(grad_x: Tensor, x: Tensor, feats: Tensor, p: Prologue, *rest) -> tuple:
    """An op's gradients with a prologue: (grad feats, *rest, None for the flow, the BN's weight and
    bias gradients, None, None)."""
    grad_feats, grad_bn_weight, grad_bn_bias = prologue_backward(grad_x, x, feats, p)
    return grad_feats, *rest, None, grad_bn_weight, grad_bn_bias, None, None


class _MaxPool(torch.autograd.Function):
    """Max-pool saving only where each output came from (one int32 per output value; aten's would
    keep the gathered maps and int64 indices), and with a prologue the features it is made from.
    Backward adds each output's gradient into its source row and channel."""

    @staticmethod
    def forward(ctx, feats: Tensor, flow: _ConvKernel, bn_weight=None, bn_bias=None, p=None) -> Tensor:
        x = op_input(feats, p, feats.dtype)
        out, flat = flow.max_pool_argmax(flow.gather(x), len(x))
        ctx.save_for_backward(flat, *((feats,) if p is not None else ()))
        ctx.shape, ctx.p = x.shape, p._replace(first=None) if p is not None else None
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        flat, *feats = ctx.saved_tensors
        rows, channels = ctx.shape
        grad_x = grad.new_zeros((rows + 1) * channels).index_add_(0, flat.view(-1), grad.reshape(-1))
        grad_x = grad_x.view(rows + 1, channels)[:rows]
        if ctx.p is None:
            return grad_x, None, None, None, None
        return grad_x_to_feats(grad_x, op_input(feats[0], ctx.p, feats[0].dtype), feats[0], ctx.p)[:5]


def _run_flow(
    flow: type[_Flow], op: SparseOp, x: ME.SparseTensor, src, dst, weight, bias, p: Prologue | None = None
) -> Tensor:
    f = flow(op, src, dst)
    bn = (p.weight, p.bias, p) if p is not None else ()
    if op.kind == "maxpool":
        return _MaxPool.apply(x.F.contiguous(), f, *bn)
    if not op.weighted:  # average pools: weightless, plain autograd
        return f.kernel(f.gather(_materialised(x.F, p)), None, None)
    dtype = compute_dtype(x.F, op)
    bias = bias.to(dtype) if bias is not None else None
    if p is not None:  # the features stay as they are: the prologue makes the input, in dtype
        return _Gathered.apply(x.F.contiguous(), weight.to(dtype), bias, f, *bn, dtype)
    return _Gathered.apply(x.F.to(dtype).contiguous(), weight.to(dtype), bias, f)


def _materialised(feats: Tensor, p: Prologue | None) -> Tensor:
    """The prologue's output as an ordinary autograd tensor, for the ops that do not fold it in."""
    return feats if p is None else BatchNormReLU.apply(feats, p.weight, p.bias, p)


def pointwise(
    op: SparseOp, feats: Tensor, weight: Tensor, bias: Tensor | None, p: Prologue | None = None
) -> Tensor:
    """A 1x1 / stride-1 conv: one GEMM on the rows [N, C] (of relu(bn(feats)) with a prologue, not
    saving it); the weight gradient comes back in the weight's own strides."""
    dtype = compute_dtype(feats, op)
    bias = bias.to(dtype) if bias is not None else None
    flow = _Pointwise(op, None, None)
    if p is None:
        return _Gathered.apply(feats.to(dtype).contiguous(), weight.to(dtype), bias, flow)
    return _Gathered.apply(feats.contiguous(), weight.to(dtype), bias, flow, p.weight, p.bias, p, dtype)


def block(
    op: SparseOp, x: ME.SparseTensor, src: BlockLayout, dst: BlockLayout, weight, bias, prologue=None
) -> Tensor:
    return _run_flow(_Block, op, x, src, dst, weight, bias, prologue)


def dense(
    op: SparseOp, x: ME.SparseTensor, src: BlockLayout, dst: BlockLayout, weight, bias, prologue=None
) -> Tensor:
    return _run_flow(_Dense, op, x, src, dst, weight, bias, prologue)


def gemm(
    op: SparseOp, x: ME.SparseTensor, src: BlockLayout, dst: BlockLayout, weight, bias, prologue=None
) -> Tensor:
    if op.kind != "conv" or op.groups != 1:
        raise ValueError(f"no gemm dataflow for {op!r}")
    return _run_flow(_Gemm, op, x, src, dst, weight, bias, prologue)


def fused(op: SparseOp, x: ME.SparseTensor, src: BlockLayout, dst: BlockLayout, weight, bias) -> Tensor:
    if op.kind != "depthwise":
        raise ValueError(f"no fused dataflow for {op!r}")
    dtype = compute_dtype(x.F, op)
    bias = bias.to(dtype) if bias is not None else None
    windows = src.window_index(op.halo, op.kernel_size, op.stride)
    symmetric = op.stride == 1 and op.kernel_size % 2 == 1
    return depthwise.FusedDepthwise.apply(
        x.F.to(dtype).contiguous(), weight.to(dtype), bias, windows, symmetric
    )


Dataflow = Callable[..., Tensor]
DATAFLOWS: dict[str, Dataflow] = {"block": block, "dense": dense, "gemm": gemm, "fused": fused, "me": me}


def candidates(op: SparseOp) -> list[str]:
    """The plain-torch dataflows that can compute `op` (what the tuner measures; ``me``, the slow
    reference, runs only when forced). ``fused`` is offered for depthwise convs where its C++ kernels
    build (elsewhere it still runs when forced, on its plain torch definition).

    An average pool that leaves padding out of its divisor runs ``dense`` only: a block's halo
    cannot tell out-of-image padding (not counted) from masked neighbours (counted, as zeros).
    """
    if op.kind == "conv" and op.groups == 1:
        return ["block", "dense", "gemm"]
    if op.kind == "avgpool" and op.halo and not op.count_include_pad:
        return ["dense"]
    if op.kind == "depthwise" and depthwise.native_available():
        return ["block", "dense", "fused"]
    return ["block", "dense"]


FOLDS_PROLOGUE = {"block", "dense", "gemm"}  # the dataflows that take a prologue without saving its output


def run(
    name: str, op: SparseOp, x: ME.SparseTensor, weight: Tensor | None, bias: Tensor | None,
    prologue: Prologue | None = None,
):  # fmt: skip
    """Compute `op` on `x` with dataflow `name`: (features [N_out, C_out], output coordinate map key).

    With a `prologue` (bn_relu.py) the op's input is relu(x.F * scale + shift): the ``block``,
    ``dense`` and ``gemm`` dataflows make it on the fly and never save it; the others get it as an
    ordinary tensor. Tensors not on a canonical block map (not made by `sparsify`) always run on
    ``me``. A batch without any site is refused, whatever the dataflow (ME's functions crash on an
    empty map).
    """
    if len(x.F) == 0:
        raise ValueError(f"no visible site in the batch (every image is fully masked): cannot run {op!r}")
    geometry = geometry_of(x)
    src = geometry.layout_of(x) if geometry is not None else None
    if prologue is not None and (src is None or name not in FOLDS_PROLOGUE):
        feats = _materialised(x.F, prologue)
        x = ME.SparseTensor(
            feats, coordinate_map_key=x.coordinate_map_key, coordinate_manager=x.coordinate_manager
        )
        prologue = None
    if src is None:
        return me(op, x, None, None, weight, bias)
    dst = geometry.layout(src.stride * op.stride)
    if name == "me":
        return me(op, x, src, dst, weight, bias)
    if prologue is not None:
        return DATAFLOWS[name](op, x, src, dst, weight, bias, prologue), dst.key
    return DATAFLOWS[name](op, x, src, dst, weight, bias), dst.key
