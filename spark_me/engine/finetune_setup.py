"""The pieces of a fine-tuning run, each from timm: transforms, loaders, Mixup/CutMix, loss, optimiser.

SparK's downstream choices where timm leaves a choice open: bicubic RandomResizedCrop, random erasing
0.25 in pixel mode, CutMix alpha 1.0 beside Mixup (switch probability 0.5), label smoothing 0.1 in
the mixed targets, LAMB with the trust ratio on every parameter and no bias correction. SparK's own
train transform used AutoAugment / TrivialAugment; here it is timm's RandAugment (`--aa`).
"""

from __future__ import annotations

import torch
from timm.data import Mixup, create_transform
from timm.data.distributed_sampler import RepeatAugSampler
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from torch import nn
from torch.utils.data import DataLoader

from spark_me.data.labelled import LabelledImages, Splits
from spark_me.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from spark_me.engine.distributed import DistEnv
from spark_me.engine.epoch_position import ResumableRanks, ResumableSampler, SeededSamples
from spark_me.engine.finetune_config import FinetuneConfig
from spark_me.engine.transfer import shard, val_transform


def train_transform(cfg: FinetuneConfig):
    """timm's training pipeline: RandomResizedCrop + flip, RandAugment, random erasing (pixel mode)."""
    return create_transform(
        cfg.input_size,
        is_training=True,
        auto_augment=None if cfg.aa in ("", "none") else cfg.aa,
        interpolation="bicubic",
        re_prob=cfg.reprob,
        re_mode="pixel",
        re_count=1,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )


def build_loaders(cfg: FinetuneConfig, env: DistEnv, splits: Splits) -> tuple[DataLoader, DataLoader]:
    """Training loader: a resumable sampler (the epoch can restart at any step boundary, see
    engine/epoch_position.py) and each sample augmented under its own (seed, epoch, index) seed,
    whatever process or worker loads it. Call `train_loader.dataset.set_epoch` and
    `train_loader.sampler.set_epoch` before each epoch."""
    labelled = LabelledImages(splits, "train", train_transform(cfg))
    train = SeededSamples(labelled, cfg.seed)
    val = LabelledImages(splits, "val", val_transform(cfg.input_size, cfg.crop_pct))
    if len(train) < cfg.batch_size * env.world_size:
        raise ValueError(
            f"{len(train)} training images are fewer than one batch ({cfg.batch_size} x {env.world_size} "
            "processes); lower --batch_size"
        )
    if cfg.rep_aug:
        sampler = ResumableRanks(
            RepeatAugSampler(train, num_replicas=env.world_size, rank=env.rank, num_repeats=cfg.rep_aug)
        )
    else:  # DistributedSampler's order (shuffled by seed + epoch, drop_last)
        sampler = ResumableSampler(train, env.world_size, env.rank, cfg.seed)
    common = dict(num_workers=cfg.num_workers, pin_memory=env.device.type == "cuda")
    train_loader = DataLoader(train, batch_size=cfg.batch_size, sampler=sampler, drop_last=True, **common)
    val_loader = DataLoader(shard(val, env), batch_size=cfg.batch_size, shuffle=False, **common)
    return train_loader, val_loader


def build_mixup(cfg: FinetuneConfig, num_classes: int) -> Mixup | None:
    if cfg.mixup_prob == 0 or (cfg.mixup == 0 and cfg.cutmix == 0):
        return None
    return Mixup(
        mixup_alpha=cfg.mixup,
        cutmix_alpha=cfg.cutmix,
        prob=cfg.mixup_prob,
        switch_prob=cfg.mixup_switch_prob,
        mode="batch",
        label_smoothing=cfg.smoothing,
        num_classes=num_classes,
    )


def build_criterion(cfg: FinetuneConfig, mixup: Mixup | None) -> nn.Module:
    """Soft targets after Mixup/CutMix (which also smooth them), else label smoothing, else plain CE."""
    if mixup is not None:
        return SoftTargetCrossEntropy()
    if cfg.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    return nn.CrossEntropyLoss()


def build_optimizer(model: nn.Module, cfg: FinetuneConfig, lr: float) -> torch.optim.Optimizer:
    """timm's optimiser with layer-wise lr decay (groups carry `lr_scale`, which timm's schedulers
    apply) and no weight decay on norms and biases. LAMB as SparK runs it: trust ratio on every
    parameter, no bias correction, no internal clipping (`--clip_grad` clips instead)."""
    extra = dict(max_grad_norm=None, always_adapt=True, bias_correction=False) if cfg.opt == "lamb" else {}
    return create_optimizer_v2(
        model,
        opt=cfg.opt,
        lr=lr,
        weight_decay=cfg.weight_decay,
        layer_decay=cfg.layer_decay if cfg.layer_decay < 1.0 else None,
        **extra,
    )
