"""Classification fine-tuning of the dense timm model: a reader can follow it top to bottom in `_run`.

timm's own pieces throughout: `create_transform` (RandAugment, random erasing), `Mixup` (Mixup and
CutMix with label smoothing), `SoftTargetCrossEntropy` / `LabelSmoothingCrossEntropy`,
`create_optimizer_v2` (layer-wise lr decay), `CosineLRScheduler` (stepped per update, so a resumed
run takes exactly the uninterrupted run's lr), `ModelEmaV3`, `RepeatAugSampler`. Checkpoints,
auto-resume, preemption (SIGTERM / SIGUSR1: a mid-epoch state, exit 75, an exact mid-epoch
resume), DDP set-up and logs follow pretraining's conventions and share its code
(engine/checkpoint.py, engine/resume.py, engine/epoch_position.py, engine/distributed.py, log.txt
JSON lines, tensorboard under output_dir/tb). What a run keeps on disk: engine/finetune_state.py.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import numpy as np
import torch
import yaml
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader

from spark_me.data.labelled import LabelledImages, find_splits
from spark_me.engine import checkpoint, distributed
from spark_me.engine.distributed import DistEnv
from spark_me.engine.epoch_position import EpochPosition
from spark_me.engine.finetune_config import FinetuneConfig
from spark_me.engine.finetune_setup import build_criterion, build_loaders, build_mixup, build_optimizer
from spark_me.engine.finetune_state import FinetuneRun, finish_epoch, full_state, load_resume_state, max_lr
from spark_me.engine.optim import build_lr_scheduler, scaled_lr
from spark_me.engine.preemption import NonFiniteLoss, StopRequest, guarded_run
from spark_me.engine.progress import progress
from spark_me.engine.resume import MidEpochSaver, position_of, refuse_foreign, stop_between_epochs
from spark_me.engine.transfer import create_model, evaluate, read_source, shard, val_transform

log = logging.getLogger("spark_me.finetune")


def autocast(cfg: FinetuneConfig, env: DistEnv):
    if not cfg.amp:
        return nullcontext()
    return torch.autocast(env.device.type, dtype=torch.bfloat16 if cfg.amp_dtype == "bf16" else torch.float16)


def seed_epoch(cfg: FinetuneConfig, epoch: int, env: DistEnv) -> None:
    """Every random choice of an epoch in the main process (Mixup/CutMix, drop path) is a function
    of the epoch, so a run resumed at an epoch boundary repeats the uninterrupted run exactly (the
    augmentations are seeded per sample: `SeededSamples`)."""
    seed = cfg.seed + 1000 * epoch + env.rank
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def train_one_epoch(
    run: FinetuneRun,
    epoch: int,
    step: int,
    start: EpochPosition | None = None,
    boundary: Callable[[int, int, list[float]], None] | None = None,
) -> tuple[float, int]:
    """One pass; returns (mean loss, optimiser steps so far). As in pretraining, with `accum_iter`
    the last `len(loader) % accum_iter` batches of an epoch are dropped.

    `start`: continue the epoch at this step boundary (its first `start.batch` micro-batches are
    done: the sampler must already skip them) with this process's random states (torch: drop path;
    numpy: Mixup/CutMix; Python) and losses as they were there. `boundary(done, step, losses)` runs
    after every optimiser step but the epoch's last (mid-epoch saves, the agreement to stop); it may
    raise `Preempted`."""
    cfg, env, model = run.cfg, run.env, run.ddp
    model.train()
    run.optimizer.zero_grad(set_to_none=True)
    used = (len(run.train_loader) // cfg.accum_iter) * cfg.accum_iter
    first = start.batch if start else 0
    mine = start.ranks[env.rank] if start else None
    losses = list(mine.losses) if mine else []
    batches = iter(run.train_loader)  # draws the workers' base seed from torch's global state ...
    if mine:  # ... so the states the steps draw from are set after that
        mine.restore(env.device)
    else:
        seed_epoch(cfg, epoch, env)
    bar = progress(
        itertools.islice(batches, used - first),
        total=used,
        initial=first,
        desc=f"epoch {epoch + 1}/{cfg.epochs}",
        enabled=env.is_main,
    )
    for i, (images, labels) in enumerate(bar, start=first):
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
        if boundary and i + 1 < used:
            boundary(i + 1, step, losses)
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


def run(cfg: FinetuneConfig) -> int:
    """0 when done, 1 on a non-finite loss, PREEMPTED_EXIT when stopped by SIGTERM / SIGUSR1."""
    env = distributed.init(cfg.device)
    output = Path(cfg.output_dir)
    return guarded_run(
        env, output, log, lambda stop: evaluate_only(cfg, env) if cfg.eval else _run(cfg, env, output, stop)
    )


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


def _run(cfg: FinetuneConfig, env: DistEnv, output: Path, stop: StopRequest) -> int:
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
    layout = {
        "world_size": env.world_size,
        "batch_size": cfg.batch_size,
        "accum_iter": cfg.accum_iter,
        "samples": len(train_loader.dataset),
        "rep_aug": cfg.rep_aug,
    }

    # -- resume (before the first write: a checkpoint that cannot continue this run changes nothing)
    start_epoch, step, best = 0, 0, {"top1": -1.0, "epoch": 0, "source": ""}
    resume, position = found.path, None
    if resume:
        state = load_resume_state(Path(resume))
        position = position_of(state, layout, resume, output)
        refuse_foreign(resume, state, model, cfg.arch, not cfg.resume)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema"):
            ema.module.load_state_dict(state["ema"])
        start_epoch, step, best = int(state["epoch"]) + 1, int(state["step"]), dict(state["best"])
        where = f", batch {position.batch} of the epoch" if position else ""
        log.info(
            "resumed from %s: epoch %d%s, step %d (its weights, not --weights)",
            resume,
            start_epoch + 1,
            where,
            step,
        )
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
        at = position if position is not None and position.epoch == epoch else None
        train_loader.dataset.set_epoch(epoch)
        train_loader.sampler.set_epoch(
            epoch, at.batch * cfg.batch_size if at else 0, at.order if at else None
        )
        epoch_start = time.monotonic()
        state_of = partial(full_state, run, best=best)
        saver = MidEpochSaver(
            cfg.save_every_steps, env, output, stop, state_of, train_loader.sampler, layout, epoch
        )
        loss, step = train_one_epoch(run, epoch, step, at, saver)
        scores = evaluate(model, val_loader, env, autocast(cfg, env))
        ema_scores = evaluate(ema.module, val_loader, env, autocast(cfg, env)) if ema is not None else None
        if env.is_main:
            best = finish_epoch(run, output, epoch, step, loss, (scores, ema_scores), best, epoch_start)
        # a signal during validation or the save
        stop_between_epochs(stop, env, epoch, cfg.epochs, step, output)
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
