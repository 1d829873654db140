"""The pretraining loop: a reader can follow it top to bottom in `run`."""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml
from torch.utils.data import ConcatDataset, DataLoader

import converters
from spark_me.data.images import ImageFiles
from spark_me.data.transforms import eval_transform, pretrain_transform
from spark_me.engine import checkpoint, distributed
from spark_me.engine.compiled import compile_dense_stages, with_report
from spark_me.engine.config import DROP_PATH, PretrainConfig
from spark_me.engine.distributed import DistEnv
from spark_me.engine.epoch_position import EpochPosition, ResumableSampler, SeededSamples
from spark_me.engine.evaluate import Validation
from spark_me.engine.optim import (
    build_lr_scheduler,
    build_optimizer,
    scaled_lr,
    set_weight_decay,
    warmup_steps,
    weight_decay_at,
)
from spark_me.engine.preemption import NonFiniteLoss, StopRequest, guarded_run
from spark_me.engine.progress import progress
from spark_me.engine.resume import MidEpochSaver, full_state, position_of, refuse_foreign, stop_between_epochs
from spark_me.engine.sizes import checkpoint_sizes, mib, numbered_kept, run_bytes
from spark_me.models.registry import create_encoder, load_factory
from spark_me.models.spark import SparK
from spark_me.sparse.sync_batchnorm import convert_sync_batchnorm
from spark_me.viz import save_reconstructions

log = logging.getLogger("spark_me.pretrain")


def build_model(cfg: PretrainConfig, dataflow_cache: Path | None = None) -> SparK:
    """The SparK model; its encoder's dataflow choices persist in `dataflow_cache` (JSON), if given."""
    if cfg.model:  # one's own nn.Module: its factory gets exactly --model_kwargs
        encoder = create_encoder(load_factory(cfg.model)(**cfg.model_kwargs), stages=cfg.stages)
    else:
        drop_path = cfg.drop_path if cfg.drop_path is not None else DROP_PATH.get(cfg.arch, 0.0)
        kwargs = {"drop_path_rate": drop_path} if drop_path else {}
        encoder = create_encoder(cfg.arch, stages=cfg.stages, **kwargs, **cfg.model_kwargs)
    encoder.set_dataflow(cfg.dataflow, dataflow_cache)
    return SparK(encoder, decoder_width=cfg.decoder_width, mask_ratio=cfg.mask_ratio)


def build_loader(cfg: PretrainConfig, env: DistEnv) -> tuple[DataLoader, ResumableSampler, ImageFiles]:
    """The training loader, its sampler and the indexed image files (indexed once: a skipped file
    is reported once). Shuffled, split over processes, each sample augmented under its own (seed,
    epoch, index) seed (`SeededSamples`), so that an epoch can be resumed at any step boundary."""
    # the embedded photographs are few: decode them once instead of at every step
    images = ImageFiles(cfg.data_path, pretrain_transform(cfg.input_size), keep_decoded=cfg.data_path is None)
    dataset = ConcatDataset([images] * cfg.repeat) if cfg.repeat > 1 else images
    global_batch = cfg.batch_size * env.world_size
    if len(dataset) < global_batch:
        raise ValueError(
            f"{len(images)} images x {cfg.repeat} repeat(s) is fewer than one batch ({cfg.batch_size} x "
            f"{env.world_size} processes); lower --batch_size or raise --repeat"
        )
    samples = SeededSamples(dataset, cfg.seed)
    sampler = ResumableSampler(samples, env.world_size, env.rank, cfg.seed)
    loader = DataLoader(
        samples,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.num_workers,
        pin_memory=env.device.type == "cuda",
        drop_last=True,
        persistent_workers=False,  # workers must receive the dataset's epoch anew every epoch
    )
    return loader, sampler, images


def picture_batch(images: ImageFiles, input_size: int, count: int = 4) -> torch.Tensor:
    """Fixed images for the reconstruction pictures (the same every epoch), from the already
    indexed training files."""
    dataset = ImageFiles(images.files[:count], eval_transform(input_size))
    return torch.stack([dataset[i] for i in range(len(dataset))])


def start_summary(cfg: PretrainConfig, model: SparK, images: int, eff_batch: int, lr: float, schedule) -> str:
    """The run in one line: arch, images, steps, lr schedule, what it will leave on disk."""
    steps_per_epoch, warmup, min_lr = schedule
    sizes = checkpoint_sizes(model)
    kept = numbered_kept(cfg.epochs, cfg.save_every, cfg.keep_last)
    disk = mib(run_bytes(sizes, cfg.epochs, cfg.save_every, cfg.keep_last))
    files = f"checkpoint-last {mib(sizes.checkpoint)} + timm-last {mib(sizes.timm)}"
    processes = eff_batch // (cfg.batch_size * cfg.accum_iter)
    batch = f"{eff_batch}" + (
        f" ({cfg.batch_size} x {cfg.accum_iter} accum x {processes} processes)"
        if eff_batch != cfg.batch_size
        else ""
    )
    return (
        f"{cfg.arch} at {cfg.input_size} px, mask {cfg.mask_ratio} | {images} images x {cfg.repeat} "
        f"repeat, batch {batch}: {steps_per_epoch} steps/epoch x {cfg.epochs} epochs = "
        f"{steps_per_epoch * cfg.epochs} steps | lr {lr:.2e} (blr {cfg.blr:g}): warmup {warmup} steps "
        f"from {lr * cfg.warmup_lr_ratio:.1e}, cosine to {min_lr:.1e} | disk ~{disk}: {files}"
        + (f", {kept} numbered pair(s)" if kept else "")
    )


def save_pictures(
    model: SparK, output: Path, epoch: int, pictures: torch.Tensor, validation: Validation | None, seed: int
) -> None:
    """reconstruction-last.png (training photographs) and, with a validation set,
    reconstruction-val-last.png (held-out ones, their fixed validation masks), each also kept as
    reconstructions/[val-]epoch-NNNN.png so that a run's progress can be seen picture by picture."""
    model.eval()
    gen = torch.Generator(device=pictures.device).manual_seed(seed)
    sets = {"": (pictures, model.mask(pictures, generator=gen))}
    if validation is not None:
        sets["val-"] = validation.pictures(len(pictures), pictures.device)
    for prefix, (images, active) in sets.items():
        numbered = output / "reconstructions" / f"{prefix}epoch-{epoch:04d}.png"
        save_reconstructions(model, images, numbered, active)
        save_reconstructions(model, images, output / f"reconstruction-{prefix}last.png", active)
    model.train()


def log_epoch_losses(writer, stats: dict) -> None:
    """Epoch train loss and (when measured) validation loss on one tensorboard chart (x: epoch)."""
    losses = {"train": stats["train_loss"]}
    if "val_loss" in stats:
        losses["val"] = stats["val_loss"]
        log.info(
            "epoch %d  validation loss %.4f  (train %.4f)",
            stats["epoch"],
            stats["val_loss"],
            stats["train_loss"],
        )
    writer.add_scalars("epoch/loss", losses, stats["epoch"])


def autocast(cfg: PretrainConfig, env: DistEnv):
    """Mixed precision for the dense decoder and projections; the ME encoder stays fp32 (see SparK)."""
    if not cfg.amp:
        return nullcontext()
    dtype = torch.bfloat16 if cfg.amp_dtype == "bf16" else torch.float16
    return torch.autocast(env.device.type, dtype=dtype)


def train_one_epoch(
    model,
    loader,
    optimizer,
    lr_sched,
    scaler,
    cfg,
    env,
    epoch,
    step,
    total_steps,
    writer,
    start: EpochPosition | None = None,
    boundary: Callable[[int, int, list[float]], None] | None = None,
):
    """One pass over the data; returns (mean loss, optimiser steps done so far).

    With `accum_iter` > 1, only whole groups of `accum_iter` micro-batches are used: the last
    `len(loader) % accum_iter` batches of the epoch are DROPPED (not loaded, no forward/backward),
    so every optimiser step averages exactly `accum_iter` micro-batches and no gradient is carried
    into the next epoch (where it would also be missing from the checkpoint a resume starts from).

    `start`: continue the epoch at this step boundary (its first `start.batch` micro-batches are
    done: the sampler must already skip them), with this process's random state and losses as they
    were there. `boundary(done, step, losses)` runs after every optimiser step except the epoch's
    last (mid-epoch saves, the agreement to stop); it may raise `Preempted`.
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)  # an epoch starts from no gradient, whatever came before
    used = (len(loader) // cfg.accum_iter) * cfg.accum_iter
    first = start.batch if start else 0
    mine = start.ranks[env.rank] if start else None
    losses = list(mine.losses) if mine else []
    batches = iter(loader)  # workers start here, drawing their seeds from the global random state ...
    if mine:  # ... so the state that masks and drop-path draw from is set after that
        mine.restore(env.device)
    else:
        torch.manual_seed(cfg.seed + 1000 * epoch + env.rank)  # masks, drop-path: a function of the epoch
    bar = progress(
        itertools.islice(batches, used - first),
        total=used,
        desc=f"epoch {epoch + 1}/{cfg.epochs}",
        enabled=env.is_main,
        initial=first,
    )
    for i, images in enumerate(bar, start=first):
        images = images.to(env.device, non_blocking=True)
        last_micro = (i + 1) % cfg.accum_iter == 0
        sync = model.no_sync() if env.distributed and not last_micro else nullcontext()
        with sync:
            with autocast(cfg, env):
                loss = model(images)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise NonFiniteLoss(f"loss is {value} at epoch {epoch + 1}, step {step}")
            (scaler.scale(loss / cfg.accum_iter) if scaler else loss / cfg.accum_iter).backward()
        losses.append(value)
        if not last_micro:
            continue
        lr_sched.step_update(num_updates=step)  # lr and wd for update number `step`
        wd = weight_decay_at(step, total_steps, cfg.weight_decay, cfg.weight_decay_end)
        set_weight_decay(optimizer, wd)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        lr = optimizer.param_groups[0]["lr"]
        bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}")
        if writer:
            writer.add_scalar("train/loss", value, step)
            writer.add_scalar("train/lr", lr, step)
            writer.add_scalar("train/weight_decay", wd, step)
        if boundary and i + 1 < used:
            boundary(i + 1, step, losses)
    return distributed.all_mean(sum(losses) / max(len(losses), 1), env), step


def run(cfg: PretrainConfig) -> int:
    """0 when done, 1 on a non-finite loss, PREEMPTED_EXIT when stopped by SIGTERM / SIGUSR1."""
    env = distributed.init(cfg.device)
    output = Path(cfg.output_dir)
    return guarded_run(env, output, log, lambda stop: _run(cfg, env, output, stop))


def _run(cfg: PretrainConfig, env: DistEnv, output: Path, stop: StopRequest) -> int:
    # -- set-up: everything that can refuse the run comes before the first write to output_dir --
    torch.manual_seed(cfg.seed + env.rank)
    found = checkpoint.resume_source(cfg.resume, cfg.auto_resume, env, output)
    resume = found.path
    state = checkpoint.load(resume) if resume else None
    if cfg.data_path is None:
        log.info("no --data_path: pretraining on the embedded photographs (preset %r)", cfg.preset)
    loader, sampler, image_files = build_loader(cfg, env)
    steps_per_epoch = len(loader) // cfg.accum_iter
    if steps_per_epoch == 0:
        raise ValueError(f"--accum_iter {cfg.accum_iter} exceeds the {len(loader)} batches of an epoch")
    layout = {
        "world_size": env.world_size,
        "batch_size": cfg.batch_size,
        "accum_iter": cfg.accum_iter,
        "samples": len(loader.dataset),
    }
    position = position_of(state, layout, resume, output)
    init = converters.load_state(cfg.init_weight) if cfg.init_weight else None
    model = build_model(cfg, output / "dataflows.json" if env.is_main else None).to(env.device)
    if init is not None:
        model.encoder.load_state_dict(converters.from_timm(init, cfg.arch, **cfg.model_kwargs), strict=True)
        log.info("encoder initialised from %s", cfg.init_weight)

    lr, eff_batch = scaled_lr(cfg, env.world_size)
    if len(loader) % cfg.accum_iter:
        log.info(
            "--accum_iter %d does not divide the %d batches of an epoch: the last %d of each epoch "
            "are dropped",
            cfg.accum_iter,
            len(loader),
            len(loader) % cfg.accum_iter,
        )
    total_steps = cfg.epochs * steps_per_epoch
    optimizer = build_optimizer(model, cfg, lr)
    lr_sched = build_lr_scheduler(optimizer, cfg, lr, steps_per_epoch)
    scaler = torch.amp.GradScaler(env.device.type) if cfg.amp and cfg.amp_dtype == "fp16" else None
    warmup, why = warmup_steps(cfg, steps_per_epoch)
    min_lr = cfg.min_lr if cfg.min_lr is not None else lr * cfg.min_lr_ratio
    if env.is_main:
        log.info("warmup: %d of %d steps (%s)", warmup, total_steps, why)
        schedule = (steps_per_epoch, warmup, min_lr)
        log.info("%s", start_summary(cfg, model, len(image_files), eff_batch, lr, schedule))

    # -- resume ---------------------------------------------------------------------------------
    start_epoch, step = 0, 0
    if state is not None:
        refuse_foreign(resume, state, model, cfg.arch, not cfg.resume)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, step = int(state["epoch"]) + 1, int(state["step"])
        where = f", batch {position.batch} of the epoch" if position else ""
        log.info("resumed from %s: epoch %d%s, step %d", resume, start_epoch + 1, where, step)
    if env.is_main:  # every check passed: the first changes to output_dir
        checkpoint.keep_unreadable(found)
        output.mkdir(parents=True, exist_ok=True)
        (output / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    if env.distributed and cfg.sync_bn:  # encoder, densify and decoder BNs: statistics of all processes
        convert_sync_batchnorm(model)
    report = compile_dense_stages(model, cfg.compile_backend) if cfg.compile else None
    ddp = distributed.wrap(model, env)
    writer = None
    if env.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(cfg.log_dir or str(output / "tb"))
    pictures = picture_batch(image_files, cfg.input_size).to(env.device) if env.is_main else None
    validation = Validation.from_config(cfg) if env.is_main else None

    # -- epochs ---------------------------------------------------------------------------------
    def state_of(finished_epoch: int, step: int) -> dict:
        return full_state(model, optimizer, scaler, cfg, finished_epoch, step)

    started = time.monotonic()
    for epoch in range(start_epoch, cfg.epochs):
        at = position if position is not None and position.epoch == epoch else None
        loader.dataset.set_epoch(epoch)
        sampler.set_epoch(epoch, at.batch * cfg.batch_size if at else 0, at.order if at else None)
        epoch_start = time.monotonic()
        saver = MidEpochSaver(cfg.save_every_steps, env, output, stop, state_of, sampler, layout, epoch)
        boundary = with_report(report if env.is_main else None, saver)
        loss, step = train_one_epoch(
            ddp, loader, optimizer, lr_sched, scaler, cfg, env, epoch, step, total_steps, writer, at, boundary
        )
        if env.is_main:
            stats = {
                "epoch": epoch + 1,
                "step": step,
                "train_loss": loss,
                "lr": optimizer.param_groups[0]["lr"],
                "weight_decay": optimizer.param_groups[0]["weight_decay"],
                "epoch_time": time.monotonic() - epoch_start,
            }
            if validation and validation.due(epoch):
                stats["val_loss"] = validation.loss(model, autocast(cfg, env))
            log_epoch_losses(writer, stats)
            with open(output / "log.txt", "a") as fh:
                fh.write(json.dumps(stats) + "\n")
            # numbered copies only at multiples of --save_every: the last epoch is checkpoint-last already
            numbered = cfg.save_every > 0 and (epoch + 1) % cfg.save_every == 0
            checkpoint.save(output, state_of(epoch, step), epoch + 1, numbered, cfg.keep_last)
            if (epoch + 1) % cfg.recon_every == 0 or epoch + 1 == cfg.epochs:
                save_pictures(model, output, epoch + 1, pictures, validation, cfg.seed)
            if report:  # the first step's compile, if the epoch had one step; evaluation's compile
                report()
            elapsed = time.monotonic() - started
            eta = elapsed / (epoch + 1 - start_epoch) * (cfg.epochs - epoch - 1)
            log.info(
                "epoch %d/%d  loss %.4f  lr %.2e  (%.1f s, ETA %.0f s)",
                epoch + 1,
                cfg.epochs,
                loss,
                stats["lr"],
                stats["epoch_time"],
                eta,
            )
        # a signal during validation or the save
        stop_between_epochs(stop, env, epoch, cfg.epochs, step, output)
    distributed.barrier(env)
    if writer:
        writer.close()
    if env.is_main:
        log.info("done: %s, timm weights %s", output / "checkpoint-last.pth", output / "timm-last.pth")
    return 0
