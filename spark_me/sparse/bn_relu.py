"""BatchNorm + ReLU folded into the next op's input, so that the ReLU's output is never saved.

Layer by layer, autograd keeps two tensors per conv -> BN -> ReLU unit: the BN's input y (for the
BN's backward) and the ReLU's output r (for the ReLU's backward and the next conv's weight
gradient). But r = relu(y * alpha + beta) is one elementwise pass away from y, so the ops that take
a `Prologue` (the gathered dataflows, the pointwise conv and the max-pool of dataflows.py) are given
r for their forward and remake it from y in their backward: one saved tensor per unit instead of
two. In a sparse ResNet this takes the saved activations from ~0.58x to under 0.5x of masked-dense
(benchmarks/README.md, "Memory").

The ops' backward also does the BN's: aten's own batch-norm backward (the statistics' gradient
included) for local batch statistics, the all-reduced one of sync_batchnorm.py under DDP, and the
affine map's in eval. The statistics come from aten's kernels (`batch_norm_update_stats`, which
moves the running statistics exactly as F.batch_norm does), and r is made by aten's batch-norm
transform with the folded alpha, beta, so the remade r equals the first bit for bit.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from spark_me.sparse.sync_batchnorm import (
    global_moments,
    sync_batch_norm_backward,
    synchronised,
    tracked_momentum,
    update_running_stats,
)


class Prologue(NamedTuple):
    """An op's input is relu(bn(features)): what it needs to make it and to differentiate it.

    weight, bias [C]: the BN's (the op's backward returns their gradients); mean, invstd [C] (>=
    float32): the statistics it normalises with; `batch`: they are the batch's own, so their
    gradient reaches the features (all-reduced over `group` when `sync`, of `count` rows in all);
    first: relu(bn(features)), made once for the op's forward (never kept by the op).
    """

    weight: Tensor
    bias: Tensor
    mean: Tensor
    invstd: Tensor
    eps: float
    batch: bool
    sync: bool
    group: Any
    count: Tensor | None
    first: Tensor | None


def remake(feats: Tensor, p: Prologue) -> Tensor:
    """relu(bn(feats)) [N, C] in the features' dtype: aten's batch-norm transform with alpha =
    weight * invstd, beta = bias - mean * alpha (a unit variance, zero mean and eps), so it runs
    aten's one-pass kernel (float math for bf16 rows) and gives the same bits each time."""
    alpha = p.invstd * p.weight.to(p.invstd.dtype)
    beta = p.bias.to(alpha.dtype) - p.mean * alpha
    unit, zero = torch.ones_like(alpha), torch.zeros_like(alpha)
    return torch.native_batch_norm(feats, alpha, beta, zero, unit, False, 0.0, 0.0)[0].relu_()


def op_input(feats: Tensor, p: Prologue | None, dtype: torch.dtype) -> Tensor:
    """The op's input in `dtype`: the features, or relu(bn(features)) (first made, or remade)."""
    if p is None:
        return feats.to(dtype)
    return (p.first if p.first is not None else remake(feats, p)).to(dtype)


def prologue_backward(grad_r: Tensor, r: Tensor, feats: Tensor, p: Prologue) -> tuple[Tensor, ...]:
    """Gradients of r = relu(bn(feats)): (grad_feats [N, C], grad BN weight, grad BN bias)."""
    g = torch.ops.aten.threshold_backward(grad_r, r.to(grad_r.dtype), 0).to(feats.dtype)  # ReLU's own
    if p.batch and p.sync:
        return sync_batch_norm_backward(g, feats, p.weight, p.mean, p.invstd, p.count, p.group)
    if p.batch:
        grads = torch.ops.aten.native_batch_norm_backward(
            g, feats, p.weight, None, None, p.mean, p.invstd, True, p.eps, [True, True, True]
        )
        return tuple(grads)
    acc = p.invstd.dtype  # eval: an affine map of the features
    wide = g.to(acc)
    xhat = (feats.to(acc) - p.mean) * p.invstd
    grad_feats = (wide * (p.invstd * p.weight.to(acc))).to(feats.dtype)
    return grad_feats, (wide * xhat).sum(0).to(p.weight.dtype), wide.sum(0).to(p.weight.dtype)


class BatchNormReLU(torch.autograd.Function):
    """relu(bn(feats)) as an ordinary autograd tensor, for the ops that do not fold it in (it saves
    the features; whoever uses its output saves that)."""

    @staticmethod
    def forward(ctx, feats: Tensor, weight: Tensor, bias: Tensor, p: Prologue) -> Tensor:
        r = op_input(feats, p, feats.dtype)
        ctx.save_for_backward(feats, r)
        ctx.p = p._replace(first=None)
        return r

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        feats, r = ctx.saved_tensors
        return *prologue_backward(grad, r, feats, ctx.p), None


def batchnorm_relu(bn: nn.modules.batchnorm._BatchNorm, rows: Tensor) -> Prologue:
    """The prologue that stands for relu(bn(rows)), with `bn`'s semantics in every mode: batch
    statistics in training (all-reduced when `bn` is synchronised, see sync_batchnorm.py) and its
    running statistics moved as F.batch_norm moves them; the running statistics in eval."""
    if bn.weight is None or bn.bias is None:
        raise ValueError(f"{type(bn).__name__} without affine parameters cannot be folded into the next op")
    acc = torch.promote_types(rows.dtype, torch.float32)
    batch = bn.training or bn.running_mean is None
    sync = batch and synchronised(bn)
    count = None
    with torch.no_grad():
        if not batch:
            mean, var = bn.running_mean.to(acc), bn.running_var.to(acc)
        elif sync:
            momentum = tracked_momentum(bn)
            mean, var, count, _ = global_moments(rows.to(acc), bn.sync_group)
            if bn.running_mean is not None:
                update_running_stats(bn.running_mean, bn.running_var, mean, var, count, momentum)
        else:
            if rows.shape[0] <= 1:
                raise ValueError(f"Expected more than 1 value per channel when training, got {rows.shape[0]}")
            momentum = tracked_momentum(bn) if bn.training else 0.0
            running = (bn.running_mean, bn.running_var)
            if bn.running_mean is None or not bn.training:  # statistics only: a scratch pair to move
                running = (rows.new_zeros(rows.shape[1], dtype=acc), rows.new_ones(rows.shape[1], dtype=acc))
            mean, var = torch.batch_norm_update_stats(rows, *running, momentum)
        invstd = torch.rsqrt(var + bn.eps)
        p = Prologue(bn.weight, bn.bias, mean, invstd, bn.eps, batch, sync, bn.sync_group, count, None)
        return p._replace(first=remake(rows, p))
