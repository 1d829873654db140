"""Classification fine-tuning of the dense timm model: a reader can follow it top to bottom in `_run`.

timm's own pieces throughout: `create_transform` (RandAugment, random erasing), `Mixup` (Mixup and
CutMix with label smoothing), `SoftTargetCrossEntropy` / `LabelSmoothingCrossEntropy`,
`create_optimizer_v2` (layer-wise lr decay), `CosineLRScheduler` (stepped per update, so a resumed
run takes exactly the uninterrupted run's lr), `ModelEmaV3`, `RepeatAugSampler`. Checkpoints,
auto-resume, DDP set-up and logs follow pretraining's conventions (engine/checkpoint.py,
engine/distributed.py, log.txt JSON lines, tensorboard under output_dir/tb).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from timm.data import Mixup
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader

from converters.io import NotACheckpoint, load_state, save_state
from spark_me.data.labelled import LabelledImages, find_splits
from spark_me.engine import checkpoint, distributed
from spark_me.engine.distributed import DistEnv
from spark_me.engine.finetune_config import FinetuneConfig
from spark_me.engine.finetune_setup import build_criterion, build_loaders, build_mixup, build_optimizer
from spark_me.engine.optim import build_lr_scheduler, scaled_lr
from spark_me.engine.progress import progress
from spark_me.engine.transfer import Scores, create_model, evaluate, read_source, shard, val_transform

log = logging.getLogger("spark_me.finetune")


class NonFiniteLoss(RuntimeError):
    pass


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


def autocast(cfg: FinetuneConfig, env: DistEnv):
    if not cfg.amp:
        return nullcontext()
    return torch.autocast(env.device.type, dtype=torch.bfloat16 if cfg.amp_dtype == "bf16" else torch.float16)


def seed_epoch(cfg: FinetuneConfig, epoch: int, env: DistEnv) -> None:
    """Every random choice of an epoch (crops, RandAugment, Mixup, drop path) is a function of the
    epoch, so a run resumed at an epoch boundary repeats the uninterrupted run exactly."""
    seed = cfg.seed + 1000 * epoch + env.rank
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def max_lr(optimizer: torch.optim.Optimizer) -> float:
    return max(group["lr"] for group in optimizer.param_groups)


def train_one_epoch(run: FinetuneRun, epoch: int, step: int) -> tuple[float, int]:
    """One pass; returns (mean loss, optimiser steps so far). As in pretraining, with `accum_iter`
    the last `len(loader) % accum_iter` batches of an epoch are dropped."""
    cfg, env, model = run.cfg, run.env, run.ddp
    model.train()
    run.optimizer.zero_grad(set_to_none=True)
    used = (len(run.train_loader) // cfg.accum_iter) * cfg.accum_iter
    losses = []
    bar = progress(
        itertools.islice(run.train_loader, used),
        total=used,
        desc=f"epoch {epoch + 1}/{cfg.epochs}",
        enabled=env.is_main,
    )
    for i, (images, labels) in enumerate(bar):
        images, labels = images.to(env.device, non_blocking=True), labels.to(env.device, non_blocking=True)
        if run.mixup is not None:
            images, labels = run.mixup(images, labels)
        last_micro = (i + 1) % cfg.accum_iter == 0
        with model.no_sync() if env.distributed and not last_micro else nullcontext():
            with autocast(cfg, env):
                loss = run.criterion(model(images), labels)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise NonFiniteLoss(f"loss is {value} at epoch {epoch + 1}, step {step}")
            (run.scaler.scale(loss / cfg.accum_iter) if run.scaler else loss / cfg.accum_iter).backward()
        losses.append(value)
        if not last_micro:
            continue
        run.lr_sched.step_update(num_updates=step)
        if run.scaler:
            run.scaler.unscale_(run.optimizer)
        if cfg.clip_grad:
            nn.utils.clip_grad_norm_(run.model.parameters(), cfg.clip_grad)
        if run.scaler:
            run.scaler.step(run.optimizer)
            run.scaler.update()
        else:
            run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        step += 1
        if run.ema is not None:
            run.ema.update(run.model, step=step)
        bar.set_postfix(loss=f"{value:.4f}", lr=f"{max_lr(run.optimizer):.2e}")
        if run.writer:
            run.writer.add_scalar("train/loss", value, step)
            run.writer.add_scalar("train/lr", max_lr(run.optimizer), step)
    return distributed.all_mean(sum(losses) / max(len(losses), 1), env), step


def sync_batchnorm(model: nn.Module, env: DistEnv) -> nn.Module:
    """BatchNorm statistics over all processes (SparK's default), with timm's conversion, which also
    handles its BatchNormAct2d. torch's SyncBatchNorm runs on GPUs only: on the CPU each process
    keeps its own statistics (said in the log)."""
    if env.device.type != "cuda":
        log.info("--sync_bn: SyncBatchNorm needs GPUs; on the CPU each process keeps its own BN statistics")
        return model
    from timm.layers import convert_sync_batchnorm

    return convert_sync_batchnorm(model)


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


def save(run: FinetuneRun, output: Path, epoch: int, step: int, best: dict) -> None:
    """checkpoint-last.pth (full state, atomic) and timm-last.pth (the model alone, timm's keys)."""
    state = {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler else None,
        "ema": run.ema.module.state_dict() if run.ema is not None else None,
        "epoch": epoch,
        "step": step,
        "best": best,
        "config": run.cfg.to_dict(),
    }
    save_state(state, output / "checkpoint-last.pth")
    save_state(state["model"], output / "timm-last.pth")


def run(cfg: FinetuneConfig) -> int:
    env = distributed.init(cfg.device)
    output = Path(cfg.output_dir)
    try:
        return evaluate_only(cfg, env) if cfg.eval else _run(cfg, env, output)
    except NonFiniteLoss as err:
        log.error("%s: stopping. The last good checkpoint is kept: %s", err, output / "checkpoint-last.pth")
        return 1
    finally:
        distributed.cleanup(env)


def evaluate_only(cfg: FinetuneConfig, env: DistEnv) -> int:
    """`--eval`: top-1 / top-5 of --weights on val/ (its classifier must fit the classes)."""
    if not cfg.weights:
        raise ValueError("--eval needs --weights (timm-best.pth, timm-last.pth or a fine-tuning checkpoint)")
    splits = find_splits(cfg.data_path)
    source = read_source(cfg.weights, cfg.arch)
    model, loaded = create_model(cfg.arch, len(splits.classes), cfg.model_kwargs, source)
    head = [k for k in model.state_dict() if k not in loaded and not k.endswith("num_batches_tracked")]
    if head:
        raise ValueError(
            f"--weights {cfg.weights} has no classifier for the {len(splits.classes)} classes of "
            f"{cfg.data_path} ({', '.join(head)} missing or of another size): evaluate a fine-tuned export"
        )
    val = LabelledImages(splits, "val", val_transform(cfg.input_size, cfg.crop_pct))
    loader = DataLoader(shard(val, env), batch_size=cfg.batch_size, num_workers=cfg.num_workers)
    scores = evaluate(model.to(env.device), loader, env, autocast(cfg, env))
    if env.is_main:
        log.info(
            "%s on %s/val (%d images): top-1 %.2f%%  top-5 %.2f%%  loss %.4f",
            cfg.weights,
            cfg.data_path,
            scores.count,
            scores.top1,
            scores.top5,
            scores.loss,
        )
    return 0


def _run(cfg: FinetuneConfig, env: DistEnv, output: Path) -> int:
    # -- checks and set-up: every bad input fails here, in one line, before anything trains ---------
    found = checkpoint.resume_source(cfg.resume, cfg.auto_resume, env, output)
    splits = find_splits(cfg.data_path)
    source = read_source(cfg.weights, cfg.arch)
    torch.manual_seed(cfg.seed)  # the classifier's initialisation: the same in every process
    model, _ = create_model(
        cfg.arch, len(splits.classes), cfg.model_kwargs, source, drop_path_rate=cfg.drop_path
    )
    train_loader, val_loader = build_loaders(cfg, env, splits)
    if env.distributed and cfg.sync_bn:  # before the optimiser and EMA see the parameters
        model = sync_batchnorm(model, env)
    model.to(env.device)
    lr, eff_batch = scaled_lr(cfg, env.world_size)
    steps_per_epoch = len(train_loader) // cfg.accum_iter
    if steps_per_epoch == 0:
        raise ValueError(f"--accum_iter {cfg.accum_iter} exceeds the {len(train_loader)} batches of an epoch")
    optimizer = build_optimizer(model, cfg, lr)
    lr_sched = build_lr_scheduler(optimizer, cfg, lr, steps_per_epoch)
    scaler = torch.amp.GradScaler(env.device.type) if cfg.amp and cfg.amp_dtype == "fp16" else None
    mixup = build_mixup(cfg, len(splits.classes))
    ema = ModelEmaV3(model, decay=cfg.ema, use_warmup=True) if cfg.ema > 0 else None
    if env.is_main:
        checkpoint.keep_unreadable(found)  # (the unreadable ones auto-resume skipped)
        output.mkdir(parents=True, exist_ok=True)
        (output / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    log.info("recipe: %s (values not set by a flag or the YAML file)", cfg.recipe)
    log.info(
        "%s, %d classes, %d steps/epoch, %d epochs | %s lr %.3e (blr %s), effective batch %d "
        "(%d per process x %d accum x %d processes), layer decay %s, weight decay %s",
        cfg.arch,
        len(splits.classes),
        steps_per_epoch,
        cfg.epochs,
        cfg.opt,
        lr,
        cfg.blr,
        eff_batch,
        cfg.batch_size,
        cfg.accum_iter,
        env.world_size,
        cfg.layer_decay,
        cfg.weight_decay,
    )

    # -- resume -----------------------------------------------------------------------------------
    start_epoch, step, best = 0, 0, {"top1": -1.0, "epoch": 0, "source": ""}
    resume = found.path
    if resume:
        state = load_resume_state(Path(resume))
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema"):
            ema.module.load_state_dict(state["ema"])
        start_epoch, step, best = int(state["epoch"]) + 1, int(state["step"]), dict(state["best"])
        log.info("resumed from %s: epoch %d, step %d (its weights, not --weights)", resume, start_epoch, step)

    ddp = distributed.wrap(model, env)
    writer = None
    if env.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(cfg.log_dir or str(output / "tb"))
    run = FinetuneRun(
        cfg, env, model, ddp, ema, optimizer, lr_sched, scaler, mixup,
        build_criterion(cfg, mixup), train_loader, val_loader, writer,
    )  # fmt: skip

    # -- epochs -----------------------------------------------------------------------------------
    for epoch in range(start_epoch, cfg.epochs):
        train_loader.sampler.set_epoch(epoch)
        seed_epoch(cfg, epoch, env)
        epoch_start = time.monotonic()
        loss, step = train_one_epoch(run, epoch, step)
        scores = evaluate(model, val_loader, env, autocast(cfg, env))
        ema_scores = evaluate(ema.module, val_loader, env, autocast(cfg, env)) if ema is not None else None
        if not env.is_main:
            continue
        stats = epoch_stats(epoch, step, loss, max_lr(optimizer), scores, ema_scores)
        stats["epoch_time"] = time.monotonic() - epoch_start
        for name, scored in (("model", scores), ("ema", ema_scores)):
            if scored is not None and scored.top1 > best["top1"]:
                best = {"top1": scored.top1, "epoch": epoch + 1, "source": name}
                weights = model.state_dict() if name == "model" else ema.module.state_dict()
                save_state(weights, output / "timm-best.pth")
        stats["best_top1"] = best["top1"]
        with open(output / "log.txt", "a") as fh:
            fh.write(json.dumps(stats) + "\n")
        for key in ("train_loss", "val_loss", "val_top1", "val_top5", "ema_val_top1"):
            if key in stats:
                writer.add_scalar(f"epoch/{key}", stats[key], epoch + 1)
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
    distributed.barrier(env)
    if writer:
        writer.close()
    if env.is_main:
        log.info(
            "done: best val top-1 %.2f%% (epoch %d, %s weights) in %s; last epoch in %s",
            best["top1"],
            best["epoch"],
            best["source"],
            output / "timm-best.pth",
            output / "timm-last.pth",
        )
    return 0


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
