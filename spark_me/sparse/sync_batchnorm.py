"""Synchronised BatchNorm over rows [N, C] whose N differs between processes (sparse sites).

The official SparK synchronises every BN under DDP (`sbn=True`): with a small per-GPU batch, the
encoder's statistics would otherwise come from a few hundred visible sites per process. Processes
hold different numbers of visible sites, so the statistics are count-weighted: global sums and the
global count are all-reduced (two passes: the mean, then the centred second moment, which keeps
float32 variances accurate when the mean is large). The backward all-reduces the two sums the input
gradient needs; the weight and bias gradients stay local, as DDP averages them like any other.

Works with every backend that has all_reduce (gloo on the CPU, nccl on GPUs), unlike
`torch.nn.SyncBatchNorm`, which is CUDA-only.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


def all_reduce(t: Tensor, group) -> Tensor:
    dist.all_reduce(t, group=group)
    return t


def global_moments(wide: Tensor, group) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(mean, biased var, count, rows - mean) over the rows [N, C] of every process in `group`, in
    two passes (the mean, then the centred second moment: accurate float32 variances when the mean
    is large)."""
    channels = wide.shape[1]
    first = all_reduce(torch.cat([wide.sum(0), wide.new_tensor([float(wide.shape[0])])]), group)
    count = first[channels]
    mean = first[:channels] / count
    centred = wide - mean
    var = all_reduce((centred * centred).sum(0), group) / count
    return mean, var, count, centred


class _SyncBatchNormRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float, group):
        acc = torch.promote_types(x.dtype, torch.float32)
        mean, var, count, centred = global_moments(x.to(acc), group)
        invstd = (var + eps).rsqrt()
        y = (centred * invstd * weight.to(acc) + bias.to(acc)).to(x.dtype)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.count, ctx.group = count, group
        ctx.mark_non_differentiable(mean, var, count)
        return y, mean, var, count

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor, *_):
        x, weight, mean, invstd = ctx.saved_tensors
        return *sync_batch_norm_backward(grad, x, weight, mean, invstd, ctx.count, ctx.group), None, None


def sync_batch_norm_backward(
    grad: Tensor, x: Tensor, weight: Tensor, mean: Tensor, invstd: Tensor, count: Tensor, group
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad x, grad weight, grad bias) of a training BatchNorm whose statistics (mean, invstd) are
    those of `count` rows over `group`: the two sums the input gradient needs are all-reduced; the
    weight and bias gradients stay local (DDP averages them like any other)."""
    acc = mean.dtype
    g = grad.to(acc)
    xhat = (x.to(acc) - mean) * invstd
    local = torch.cat([g.sum(0), (g * xhat).sum(0)])
    channels = x.shape[1]
    grad_bias, grad_weight = local[:channels].clone(), local[channels:].clone()
    total = all_reduce(local, group) / count
    grad_x = (weight.to(acc) * invstd) * (g - total[:channels] - xhat * total[channels:])
    return grad_x.to(x.dtype), grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)


def sync_batch_norm_rows(bn: nn.modules.batchnorm._BatchNorm, rows: Tensor, group=None) -> Tensor:
    """Training-mode BatchNorm of `rows` [N, C] with statistics over the rows of every process in
    `group`; updates `bn`'s running statistics exactly as a single process holding all rows would."""
    if bn.weight is None:
        raise ValueError("synchronised BatchNorm needs affine parameters")
    momentum = tracked_momentum(bn)
    running = (bn.running_mean, bn.running_var) if bn.track_running_stats else (None, None)
    return sync_batch_norm(rows, *running, bn.weight, bn.bias, momentum, bn.eps, group)


def sync_batch_norm(
    rows: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float,
    eps: float,
    group=None,
) -> Tensor:
    """`F.batch_norm(rows, ..., training=True)` with statistics over the rows [N, C] of every
    process in `group`; the running statistics (if given) move towards the global batch statistics
    (unbiased variance) by `momentum`, as F.batch_norm's would."""
    channels = rows.shape[1]
    weight = weight if weight is not None else rows.new_ones(channels)
    bias = bias if bias is not None else rows.new_zeros(channels)
    y, mean, var, count = _SyncBatchNormRows.apply(rows, weight, bias, eps, group)
    if running_mean is not None and running_var is not None:
        update_running_stats(running_mean, running_var, mean, var, count, momentum)
    return y


def tracked_momentum(bn: nn.modules.batchnorm._BatchNorm) -> float:
    """A training step's BatchNorm bookkeeping (as nn.BatchNorm2d's): counts the batch, and returns
    the momentum (1 / batches for the cumulative average of `momentum=None`)."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average
            momentum = 1.0 / float(bn.num_batches_tracked)
    return momentum


def update_running_stats(
    running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, count: Tensor, momentum: float
) -> None:
    """Move the running statistics towards the batch's (unbiased variance) by `momentum`, as
    F.batch_norm does; `var` is the biased variance of `count` values."""
    with torch.no_grad():
        unbiased = var * (count / (count - 1)).clamp_min(0) if count > 1 else var
        running_mean.lerp_(mean.to(running_mean.dtype), momentum)
        running_var.lerp_(unbiased.to(running_var.dtype), momentum)


def synchronised(bn: nn.Module) -> bool:
    """Whether `bn` should synchronise now: asked to, training, and in a group of several processes."""
    group = getattr(bn, "sync_group", False)
    if group is False or not bn.training or not dist.is_available() or not dist.is_initialized():
        return False
    return dist.get_world_size(group) > 1


class SyncBatchNorm2dRows(nn.BatchNorm2d):
    """A dense BatchNorm2d whose statistics are synchronised through `sync_batch_norm_rows` (for the
    decoder on backends where `torch.nn.SyncBatchNorm` does not run, e.g. gloo on the CPU)."""

    sync_group = None

    def forward(self, x: Tensor) -> Tensor:
        if not synchronised(self):
            return super().forward(x)
        rows = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
        y = sync_batch_norm_rows(self, rows, self.sync_group)
        return y.view(x.shape[0], x.shape[2], x.shape[3], -1).permute(0, 3, 1, 2)


def convert_sync_batchnorm(module: nn.Module, group=None) -> nn.Module:
    """Synchronise every BatchNorm of `module` over `group` (default: the world).

    Sparse BNs (`SparseBatchNorm2d`) synchronise in place; dense `nn.BatchNorm2d`s become
    `torch.nn.SyncBatchNorm` on CUDA and `SyncBatchNorm2dRows` elsewhere (same state_dict keys).
    """
    from spark_me.sparse.layers import SparseBatchNorm2d

    if getattr(module, "syncs_batchnorm_itself", False):  # a generic encoder: its BN handler syncs
        module.sync_group = group
        return module
    for name, child in list(module.named_children()):
        syncs_itself = getattr(child, "syncs_batchnorm_itself", False)
        if syncs_itself or isinstance(child, SparseBatchNorm2d | SyncBatchNorm2dRows):
            child.sync_group = group
        elif type(child) is nn.BatchNorm2d:
            on_cuda = child.weight is not None and child.weight.is_cuda
            if on_cuda:
                new = nn.SyncBatchNorm.convert_sync_batchnorm(child, group)
            else:
                new = SyncBatchNorm2dRows(
                    child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
                )
                # the same Parameter and buffer objects: an optimiser built before the conversion
                # (as pretraining's is) must keep updating them
                for name_, tensor in (
                    *child.named_parameters(recurse=False),
                    *child.named_buffers(recurse=False),
                ):
                    setattr(new, name_, tensor)
                new.sync_group = group
                new.train(child.training)
            setattr(module, name, new)
        else:
            convert_sync_batchnorm(child, group)
    return module
