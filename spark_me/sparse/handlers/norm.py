"""Normalisation over visible sites: BatchNorm, GroupNorm, LayerNorm.

BatchNorm's batch statistics are those of the visible sites of the whole batch (SparK's sparse BN),
synchronised over the context's process group under DDP; GroupNorm's are per image and group over
the image's visible sites; LayerNorm normalises each site over its channels. timm's `BatchNormAct2d`
needs nothing special: its forward calls `F.batch_norm` and then its activation, both handled.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from spark_me.sparse.sync_batchnorm import sync_batch_norm
from spark_me.sparse.value import SparseValue, handles


def _synchronised(x: SparseValue, training: bool) -> bool:
    group = x.context.sync_group
    if group is False or not training or not dist.is_available() or not dist.is_initialized():
        return False
    return dist.get_world_size(group) > 1


@handles(F.batch_norm)
def batch_norm(
    input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5
):
    x = input
    if x.channels_last or x.feats.dim() != 2:
        raise x.context.unsupported("batch_norm on a channels-last or multi-channel-dim map")
    rows = x.feats.contiguous()  # torch 2.14: eval-mode BN backward is wrong on non-contiguous input
    if _synchronised(x, training):
        out = sync_batch_norm(
            rows, running_mean, running_var, weight, bias, momentum, eps, x.context.sync_group
        )
    else:
        out = F.batch_norm(rows, running_mean, running_var, weight, bias, training, momentum, eps)
    return x.with_feats(out)


@handles(F.group_norm)
def group_norm(input, num_groups: int, weight=None, bias=None, eps: float = 1e-5):
    """Per image and group: mean and (biased) variance over the image's visible sites and the
    group's channels, accumulated in at least float32."""
    x = input
    if x.channels_last or x.feats.dim() != 2:
        raise x.context.unsupported("group_norm on a channels-last or multi-channel-dim map")
    n, channels = x.feats.shape
    images = x.cell_images()  # sums per cell first, then per image: the gathers touch n_cells rows
    wide = torch.promote_types(x.feats.dtype, torch.float32)
    cells = x.cells().to(wide)
    per = channels // num_groups
    g = cells.reshape(len(images), cells.shape[1], num_groups, per)
    sites = g.new_zeros(x.batch).index_add_(0, images, g.new_full((len(images),), float(g.shape[1])))
    count = (sites * per).clamp_min(1).view(-1, 1)
    mean = g.new_zeros(x.batch, num_groups).index_add(0, images, g.sum((1, 3))) / count
    centred = g - mean[images][:, None, :, None]
    var = g.new_zeros(x.batch, num_groups).index_add(0, images, (centred * centred).sum((1, 3))) / count
    out = (centred * (var[images] + eps).rsqrt()[:, None, :, None]).reshape(n, channels)
    if weight is not None:
        out = out * weight.to(wide)
    if bias is not None:
        out = out + bias.to(wide)
    return x.with_feats(out.to(x.feats.dtype))


@handles(F.layer_norm)
def layer_norm(input, normalized_shape, weight=None, bias=None, eps: float = 1e-5):
    """Over the channels of each site: the value must be channels-last (timm's LayerNorm2d permutes
    first), normalised over its channels."""
    x = input
    shape = tuple(normalized_shape)
    if not x.channels_last or tuple(x.feats.shape[1:]) != shape:
        raise x.context.unsupported(f"layer_norm over {shape} of a map of shape {tuple(x.shape)}")
    return x.with_feats(F.layer_norm(x.feats, shape, weight, bias, eps))
