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
- ``me``: MinkowskiEngine's own function, the reference; float32/float64 only, so it runs in
  float32 under autocast. Its strided outputs come back in hash order and are put in canonical order.

All dataflows but ``me`` are plain torch: they run in float64 (tests), float32, and in bf16/fp16
under autocast, on any device.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property

import MinkowskiEngine as ME
import torch
import torch.nn.functional as F
from MinkowskiEngineBackend._C import ConvolutionMode
from torch import Tensor

from spark_me.sparse.geometry import BlockLayout, geometry_of
from spark_me.sparse.layout import conv_weight_to_me_depthwise, conv_weight_to_me_kernel


class SparseOp:
    """What a layer computes: a `kind` ("conv", "depthwise", "maxpool") with kernel, stride, widths."""

    def __init__(self, kind: str, kernel_size: int, stride: int, in_channels: int, out_channels: int):
        if kind not in ("conv", "depthwise", "maxpool"):
            raise ValueError(f"unknown sparse op {kind!r}")
        self.kind, self.kernel_size, self.stride = kind, kernel_size, stride
        self.in_channels, self.out_channels = in_channels, out_channels

    @property
    def signature(self) -> tuple:
        return (self.kind, self.kernel_size, self.stride, self.in_channels, self.out_channels)

    @property
    def halo(self) -> int:
        """Sites each block grows by: odd kernels are centred (padding k//2), even ones span 0..k-1."""
        return self.kernel_size // 2 if self.kernel_size % 2 else 0

    @property
    def groups(self) -> int:
        return self.in_channels if self.kind == "depthwise" else 1

    @property
    def fill(self) -> float:
        """What masked sites hold for this op: 0 for convs, -inf for max-pool (max over visible sites)."""
        return float("-inf") if self.kind == "maxpool" else 0.0

    @cached_property
    def kernel_generator(self) -> ME.KernelGenerator:
        return ME.KernelGenerator(kernel_size=self.kernel_size, stride=self.stride, dimension=2)

    def __repr__(self) -> str:
        return f"{self.kind}{self.kernel_size}x{self.kernel_size}/{self.stride} {self.in_channels}->{self.out_channels}"


def compute_dtype(feats: Tensor, op: SparseOp) -> torch.dtype:
    """The dtype a dense kernel would run in here: autocast's for convs, else the features' own."""
    device = feats.device.type
    if op.kind != "maxpool" and feats.is_floating_point() and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return feats.dtype


def _kernel_args(op: SparseOp, weight: Tensor | None, bias: Tensor | None, dtype: torch.dtype):
    w = weight.to(dtype) if weight is not None else None
    b = bias.to(dtype) if bias is not None else None
    return w, b


def _dense_kernel(op: SparseOp, x: Tensor, weight: Tensor | None, bias: Tensor | None, padding: int) -> Tensor:
    """The dense op on NCHW `x` (often a channels-last view)."""
    if op.kind == "maxpool":
        return F.max_pool2d(x, op.kernel_size, op.stride, padding)
    return F.conv2d(x, weight, bias, op.stride, padding, 1, op.groups)


def _padded(feats: Tensor, fill: float) -> Tensor:
    """[N+1, C]: the features and the pad row that masked neighbours point at."""
    return torch.cat([feats, feats.new_full((1, feats.shape[1]), fill)])


def gather_blocks(feats: Tensor, layout: BlockLayout, halo: int, fill: float = 0.0) -> Tensor:
    """[N, C] block-major -> [n_cells, b+2h, b+2h, C]; a free view when halo == 0."""
    n, b, c = layout.num_cells, layout.block, feats.shape[1]
    if halo == 0:
        return feats.view(n, b, b, c)
    index = layout.halo_index(halo)
    side = index.shape[1]
    return _padded(feats, fill).index_select(0, index.view(-1)).view(n, side, side, c)


def _as_rows(y: Tensor, channels: int) -> Tensor:
    """NCHW (ideally channels-last) -> [N*H*W, C] in (n, y, x) order."""
    return y.permute(0, 2, 3, 1).reshape(-1, channels)


def block(op: SparseOp, x: ME.SparseTensor, src: BlockLayout, dst: BlockLayout, weight, bias) -> Tensor:
    dtype = compute_dtype(x.F, op)
    w, b = _kernel_args(op, weight, bias, dtype)
    blocks = gather_blocks(x.F.to(dtype), src, op.halo, op.fill)
    y = _dense_kernel(op, blocks.permute(0, 3, 1, 2), w, b, 0)
    return _as_rows(y, op.out_channels)


def dense(op: SparseOp, x: ME.SparseTensor, src: BlockLayout, dst: BlockLayout, weight, bias) -> Tensor:
    dtype = compute_dtype(x.F, op)
    w, b = _kernel_args(op, weight, bias, dtype)
    feats = x.F.to(dtype)
    batch = src.geometry.active.shape[0]
    height, width = src.dense_hw
    canvas = feats.new_full((batch * height * width, feats.shape[1]), op.fill)
    canvas = canvas.index_copy(0, src.dense_index(), feats)
    canvas = canvas.view(batch, height, width, -1).permute(0, 3, 1, 2)
    y = _dense_kernel(op, canvas, w, b, op.halo)
    return _as_rows(y, op.out_channels).index_select(0, dst.dense_index())


def gemm(op: SparseOp, x: ME.SparseTensor, src: BlockLayout, dst: BlockLayout, weight, bias) -> Tensor:
    if op.kind != "conv":
        raise ValueError(f"no gemm dataflow for {op.kind}")
    dtype = compute_dtype(x.F, op)
    w, b = _kernel_args(op, weight, bias, dtype)
    k, cin = op.kernel_size, op.in_channels
    windows = src.window_index(op.halo, k, op.stride)  # [N_out, k*k], (ky, kx) order
    cols = _padded(x.F.to(dtype), 0.0).index_select(0, windows.view(-1)).view(len(windows), k * k * cin)
    y = cols @ w.permute(2, 3, 1, 0).reshape(k * k * cin, op.out_channels)
    return y + b if b is not None else y


class _DepthwiseMapFunction(torch.autograd.Function):
    """Depthwise conv through ME's kernel map: sum over offsets of gathered inputs x weight.

    Saves only the input features and the kernel and recomputes the gathers in backward (autograd
    would keep one gathered copy per offset: O(k*k*N*C) memory instead of O(N*C)).
    """

    @staticmethod
    def forward(ctx, feats: Tensor, kernel: Tensor, maps: list[tuple[int, Tensor, Tensor]]) -> Tensor:
        out = feats.new_zeros(feats.shape)
        for offset, src, dst in maps:
            out.index_add_(0, dst, feats[src] * kernel[offset])
        ctx.save_for_backward(feats, kernel)
        ctx.maps = maps
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        feats, kernel = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_feats = torch.zeros_like(feats) if ctx.needs_input_grad[0] else None
        grad_kernel = torch.zeros_like(kernel) if ctx.needs_input_grad[1] else None
        for offset, src, dst in ctx.maps:
            g = grad_out[dst]
            if grad_feats is not None:
                grad_feats.index_add_(0, src, g * kernel[offset])
            if grad_kernel is not None:
                grad_kernel[offset] = (feats[src] * g).sum(0)
        return grad_feats, grad_kernel, None


def _me_kernel_map(op: SparseOp, x: ME.SparseTensor) -> list[tuple[int, Tensor, Tensor]]:
    """(offset, input rows, output rows) per kernel offset, from ME's cached stride-1 kernel map."""
    manager, key = x.coordinate_manager, x.coordinate_map_key
    region_type, region_offset, _ = op.kernel_generator.get_kernel(x.tensor_stride, False)
    kernel_map = manager.kernel_map(
        key, key, 1, op.kernel_size, 1, region_type=region_type, region_offset=region_offset
    )
    return [(o, io[0].long().to(x.device), io[1].long().to(x.device)) for o, io in kernel_map.items()]


def me(op: SparseOp, x: ME.SparseTensor, src: BlockLayout | None, dst: BlockLayout | None, weight, bias):
    """MinkowskiEngine's own function. Returns (features, key): canonical order and key when `dst`."""
    feats = x.F if x.F.dtype in (torch.float32, torch.float64) else x.F.float()
    with torch.autocast(x.device.type, enabled=False):
        if op.kind == "depthwise":
            kernel = conv_weight_to_me_depthwise(weight).to(feats.dtype)
            y = _DepthwiseMapFunction.apply(feats.contiguous(), kernel, _me_kernel_map(op, x))
            out_key = x.coordinate_map_key
        else:
            out_key = ME.CoordinateMapKey(x.coordinate_map_key.get_coordinate_size())
            if op.kind == "maxpool":
                y = ME.MinkowskiLocalPoolingFunction.apply(
                    feats, ME.PoolingMode.LOCAL_MAX_POOLING, op.kernel_generator,
                    x.coordinate_map_key, out_key, x._manager,
                )  # fmt: skip
            else:
                y = ME.MinkowskiConvolutionFunction.apply(
                    feats, conv_weight_to_me_kernel(weight).to(feats.dtype).contiguous(), op.kernel_generator,
                    ConvolutionMode.DEFAULT, x.coordinate_map_key, out_key, x._manager,
                )  # fmt: skip
        if bias is not None:
            y = y + bias.to(y.dtype)
    if dst is None:
        return y, out_key
    if out_key != dst.key:  # strided: ME's hash order -> canonical block-major order
        rows = dst.geometry.canonical_rows(x.coordinate_manager.get_coordinates(out_key), dst.stride)
        order = torch.empty_like(rows)
        order[rows] = torch.arange(len(rows), device=rows.device)
        y = y.index_select(0, order)
    return y, dst.key


Dataflow = Callable[..., Tensor]
DATAFLOWS: dict[str, Dataflow] = {"block": block, "dense": dense, "gemm": gemm, "me": me}


def candidates(op: SparseOp) -> list[str]:
    """The dataflows the tuner measures for `op` (``me``, the slow reference, only when forced)."""
    names = ["block", "dense"]
    if op.kind == "conv" and op.halo > 0:
        names.append("gemm")
    return names


def run(name: str, op: SparseOp, x: ME.SparseTensor, weight: Tensor | None, bias: Tensor | None):
    """Compute `op` on `x` with dataflow `name`: (features [N_out, C_out], output coordinate map key).

    Tensors not on a canonical block map (not made by `sparsify`) always run on ``me``.
    """
    geometry = geometry_of(x)
    src = geometry.layout_of(x) if geometry is not None else None
    if src is None:
        return me(op, x, None, None, weight, bias)
    dst = geometry.layout(src.stride * op.stride)
    if name == "me":
        return me(op, x, src, dst, weight, bias)
    return DATAFLOWS[name](op, x, src, dst, weight, bias), dst.key
