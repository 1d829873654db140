"""LAMB (timm's), cosine lr with linear warmup (timm's scheduler), cosine weight-decay ramp.

All schedules are functions of the optimiser-step count, so resuming at step s reproduces the
uninterrupted run exactly.
"""

from __future__ import annotations

import math

from timm.optim import Lamb
from timm.scheduler import CosineLRScheduler
from torch import nn

from spark_me.engine.config import PretrainConfig, resolved_warmup

# no weight decay: 1-D parameters (norms, biases, GRN, layer scale) and SparK's mask tokens
NO_DECAY_NAMES = ("mask_tokens", "gamma")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or any(n in name for n in NO_DECAY_NAMES):
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay, "decay": True},
        {"params": no_decay, "weight_decay": 0.0, "decay": False},
    ]


def scaled_lr(cfg: PretrainConfig, world_size: int) -> tuple[float, int]:
    """(lr, effective batch): lr = blr x effective batch / 256 unless --lr gives it outright;
    effective batch = batch_size (per process) x accum_iter x world_size."""
    eff_batch = cfg.batch_size * cfg.accum_iter * world_size
    return (cfg.lr if cfg.lr is not None else cfg.blr * eff_batch / 256), eff_batch


def default_betas(arch: str) -> tuple[float, float]:
    return (0.9, 0.95) if arch.startswith("resnet") else (0.9, 0.999)


def build_optimizer(model: nn.Module, cfg: PretrainConfig, lr: float) -> Lamb:
    """LAMB with global grad-norm clipping inside (SparK clips at 5.0)."""
    return Lamb(
        param_groups(model, cfg.weight_decay),
        lr=lr,
        betas=cfg.betas or default_betas(cfg.arch),
        max_grad_norm=cfg.clip_grad if cfg.clip_grad and cfg.clip_grad > 0 else None,
    )


def warmup_steps(cfg: PretrainConfig, steps_per_epoch: int) -> tuple[int, str]:
    """(optimiser steps of linear warmup, why): the resolved warmup epochs in steps, rounded, and
    always at least one step short of the run, so that the peak lr and the cosine are reached."""
    epochs, why = resolved_warmup(cfg)
    total = cfg.epochs * steps_per_epoch
    steps = round(epochs * steps_per_epoch)
    if steps > total - 1:
        steps, why = max(total - 1, 0), f"{why}, cut to leave one step after it"
    return steps, f"{epochs:.3g} epochs: {why}"


def build_lr_scheduler(optimizer, cfg: PretrainConfig, lr: float, steps_per_epoch: int) -> CosineLRScheduler:
    warmup, _ = warmup_steps(cfg, steps_per_epoch)
    total = max(cfg.epochs * steps_per_epoch, warmup + 1)
    return CosineLRScheduler(
        optimizer,
        t_initial=total - warmup,
        lr_min=cfg.min_lr if cfg.min_lr is not None else lr * cfg.min_lr_ratio,
        warmup_t=warmup,
        warmup_lr_init=lr * cfg.warmup_lr_ratio,
        warmup_prefix=True,
        t_in_epochs=False,
    )


def weight_decay_at(step: int, total_steps: int, start: float, end: float) -> float:
    """Cosine ramp from `start` to `end` over the run (SparK raises it: 0.04 -> 0.2).

    timm's schedulers would also apply the ramp to the no-decay group, so this one is by hand.
    """
    progress = min(step / max(total_steps - 1, 1), 1.0)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * progress))


def set_weight_decay(optimizer, value: float) -> None:
    for group in optimizer.param_groups:
        if group.get("decay"):
            group["weight_decay"] = value
