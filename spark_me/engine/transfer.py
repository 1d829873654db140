"""What fine-tuning and the probes share: the dense timm model with `--weights`, the validation
transform, and top-1 / top-5 on a labelled split (exact under DDP: each process counts its own shard).
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.data import create_transform
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from spark_me.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from spark_me.engine.distributed import DistEnv
from spark_me.engine.transfer_weights import SourceWeights, load_into, read_weights

log = logging.getLogger(__name__)


def val_transform(input_size: int, crop_pct: float = 0.95):
    """Resize to input_size / crop_pct (bicubic), centre crop, normalise (SparK's evaluation)."""
    return create_transform(
        input_size,
        is_training=False,
        interpolation="bicubic",
        crop_pct=crop_pct,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )


def read_source(weights: str | None, arch: str) -> SourceWeights | None:
    """`--weights` read and checked against the arch name (before the data is indexed)."""
    return read_weights(weights, arch) if weights else None


def create_model(
    arch: str, num_classes: int, model_kwargs: dict, source: SourceWeights | None, **timm_kwargs
) -> tuple[nn.Module, list[str]]:
    """The dense timm model with `source` loaded (backbone checked key for key); (model, loaded keys).

    A pretraining checkpoint's architecture kwargs (depths, widths) are used when none are given.
    """
    kwargs = dict(model_kwargs) or (dict(source.model_kwargs) if source else {})
    try:
        model = timm.create_model(arch, num_classes=num_classes, **kwargs, **timm_kwargs)
    except RuntimeError as err:  # timm's "Unknown model (...)"
        raise ValueError(f"--arch {arch}: {err}") from err
    loaded = load_into(model, source, arch) if source else []
    if not source:
        log.info("no --weights: %s starts from random initialisation (the from-scratch baseline)", arch)
    return model, loaded


@dataclass
class Scores:
    loss: float
    top1: float  # percent
    top5: float  # percent (top-k over all classes when there are fewer than 5)
    count: int


def shard(dataset: Dataset, env: DistEnv) -> Dataset:
    """This process's share of an evaluation set: every world_size-th item, none twice."""
    if not env.distributed:
        return dataset
    return Subset(dataset, list(range(env.rank, len(dataset), env.world_size)))


@torch.no_grad()
def broadcast_buffers(model: nn.Module, env: DistEnv) -> None:
    """Rank 0's BatchNorm statistics to every process, so that each shard is scored with the model
    that rank 0 saves (without SyncBatchNorm each process's running statistics drift apart)."""
    if env.distributed:
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    env: DistEnv,
    autocast: AbstractContextManager | None = None,
) -> Scores:
    """Cross-entropy, top-1 and top-5 of `model` over `loader` (a `shard` under DDP), all processes."""
    broadcast_buffers(model, env)
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # loss sum, top-1 hits, top-5 hits, count
    for images, labels in loader:
        images, labels = images.to(env.device, non_blocking=True), labels.to(env.device)
        with autocast or nullcontext():
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[1])
        hits = logits.topk(k, dim=1).indices.eq(labels[:, None])
        sums += torch.tensor(
            [
                float(F.cross_entropy(logits, labels, reduction="sum")),
                float(hits[:, 0].sum()),
                float(hits.any(1).sum()),
                len(labels),
            ],
            dtype=torch.float64,
        )
    if env.distributed:
        sums = sums.to(env.device)
        dist.all_reduce(sums)
        sums = sums.cpu()
    model.train(was_training)
    count = max(int(sums[3]), 1)
    return Scores(float(sums[0]) / count, 100 * float(sums[1]) / count, 100 * float(sums[2]) / count, count)
