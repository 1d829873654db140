"""MinkowskiEngine's own functions as the reference dataflow ``me`` (float32/float64 kernels only).

Stride-1 outputs stay on the input's map; strided ones come back in ME's hash order and are put in
the canonical block-major order of the output stride, so ``me`` mixes with the other dataflows.
"""

from __future__ import annotations

import MinkowskiEngine as ME
import torch
from MinkowskiEngineBackend._C import ConvolutionMode
from torch import Tensor

from spark_me.sparse.geometry import BlockLayout
from spark_me.sparse.layout import conv_weight_to_me_depthwise, conv_weight_to_me_kernel
from spark_me.sparse.ops import SparseOp


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


def supports(op: SparseOp) -> bool:
    """Whether MinkowskiEngine has a function for `op` (see `me`)."""
    if op.kind == "avgpool" or (op.kind == "conv" and op.groups > 1):
        return False
    return not (op.kind == "depthwise" and op.stride != 1)


def me(op: SparseOp, x: ME.SparseTensor, src: BlockLayout | None, dst: BlockLayout | None, weight, bias):
    """MinkowskiEngine's own function. Returns (features, key): canonical order and key when `dst`.

    ME has no grouped convolution, no average pool with torch's divisor rules and only stride-1
    channel-wise kernels here: those ops have no ``me`` form (their reference in the tests is the
    masked-dense oracle).
    """
    if not supports(op):
        raise ValueError(f"MinkowskiEngine has no function for {op!r}; use another dataflow")
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
