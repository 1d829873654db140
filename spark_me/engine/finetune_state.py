"""What a fine-tuning run keeps and leaves: the objects an epoch needs (`FinetuneRun`), its full
state (checkpoint-last.pth at each epoch's end, checkpoint-mid-epoch.pth inside one), the timm
exports (timm-last.pth, timm-best.pth) and the log.txt line of each epoch."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from timm.data import Mixup
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader

from converters.io import NotACheckpoint, load_state, save_state
from spark_me.engine import checkpoint
from spark_me.engine.distributed import DistEnv
from spark_me.engine.finetune_config import FinetuneConfig
from spark_me.engine.transfer import Scores

log = logging.getLogger("spark_me.finetune")


@dataclass
class FinetuneRun:
    """Everything an epoch needs (built once in `_run`)."""

    cfg: FinetuneConfig
    env: DistEnv
    model: nn.Module  # the timm model itself (saved, loaded, EMA'd)
    ddp: nn.Module  # what the batches go through: the DDP wrapper, or the model
    ema: ModelEmaV3 | None
    optimizer: torch.optim.Optimizer
    lr_sched: object  # timm CosineLRScheduler
    scaler: torch.amp.GradScaler | None
    mixup: Mixup | None
    criterion: nn.Module
    train_loader: DataLoader
    val_loader: DataLoader
    writer: object | None  # tensorboard SummaryWriter on the main process


def max_lr(optimizer: torch.optim.Optimizer) -> float:
    return max(group["lr"] for group in optimizer.param_groups)


def load_resume_state(path: Path) -> dict:
    state = load_state(path)
    missing = [k for k in ("model", "optimizer", "epoch", "step", "config") if k not in state]
    if missing or "mask_ratio" in state.get("config", {}):
        what = f"missing {', '.join(missing)}" if missing else "a pretraining one"
        raise NotACheckpoint(
            f"{path} is not a fine-tuning checkpoint ({what}); to start from pretrained weights use "
            "--weights, and give fine-tuning its own --output_dir"
        )
    return state


def full_state(run: FinetuneRun, finished_epoch: int, step: int, best: dict) -> dict:
    """What a checkpoint holds; `finished_epoch` is the index of the last finished epoch (-1: none).
    The EMA weights are fp32 like the model's, so timm's stochastic rounding (bf16 EMA only) and
    its generator play no part."""
    return {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler else None,
        "ema": run.ema.module.state_dict() if run.ema is not None else None,
        "epoch": finished_epoch,
        "step": step,
        "best": best,
        "config": run.cfg.to_dict(),
    }


def save(run: FinetuneRun, output: Path, epoch: int, step: int, best: dict) -> None:
    """checkpoint-last.pth (full state, atomic) and timm-last.pth (the model alone, timm's keys)."""
    state = full_state(run, epoch, step, best)
    save_state(state, output / "checkpoint-last.pth")
    save_state(state["model"], output / "timm-last.pth")
    checkpoint.drop_mid_epoch(output)


def finish_epoch(
    run: FinetuneRun,
    output: Path,
    epoch: int,
    step: int,
    loss: float,
    scored: tuple[Scores, Scores | None],
    best: dict,
    epoch_start: float,
) -> dict:
    """Main process, after an epoch's validation: timm-best.pth when the model or its EMA beat the
    best so far, the log.txt line, tensorboard, the epoch-end checkpoint. Returns the best so far."""
    cfg, scores, ema_scores = run.cfg, *scored
    stats = epoch_stats(epoch, step, loss, max_lr(run.optimizer), scores, ema_scores)
    stats["epoch_time"] = time.monotonic() - epoch_start
    for name, result in (("model", scores), ("ema", ema_scores)):
        if result is not None and result.top1 > best["top1"]:
            best = {"top1": result.top1, "epoch": epoch + 1, "source": name}
            weights = run.model.state_dict() if name == "model" else run.ema.module.state_dict()
            save_state(weights, output / "timm-best.pth")
    stats["best_top1"] = best["top1"]
    with open(output / "log.txt", "a") as fh:
        fh.write(json.dumps(stats) + "\n")
    for key in ("train_loss", "val_loss", "val_top1", "val_top5", "ema_val_top1"):
        if key in stats:
            run.writer.add_scalar(f"epoch/{key}", stats[key], epoch + 1)
    save(run, output, epoch, step, best)
    log.info(
        "epoch %d/%d  loss %.4f  val top-1 %.2f%%  top-5 %.2f%%%s  (best %.2f%%, %.1f s)",
        epoch + 1,
        cfg.epochs,
        loss,
        scores.top1,
        scores.top5,
        f"  EMA top-1 {ema_scores.top1:.2f}%" if ema_scores else "",
        best["top1"],
        stats["epoch_time"],
    )
    return best


def epoch_stats(
    epoch: int, step: int, loss: float, lr: float, scores: Scores, ema_scores: Scores | None
) -> dict:
    """One log.txt line: accuracies in percent."""
    stats = {
        "epoch": epoch + 1,
        "step": step,
        "train_loss": loss,
        "lr": lr,
        "val_loss": scores.loss,
        "val_top1": scores.top1,
        "val_top5": scores.top5,
    }
    if ema_scores is not None:
        stats["ema_val_top1"] = ema_scores.top1
    return stats
