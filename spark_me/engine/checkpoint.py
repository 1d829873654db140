"""Checkpoints: atomic, resumable, loadable with `torch.load(weights_only=True)`.

output_dir/checkpoint-last.pth       full state after the last finished epoch
output_dir/checkpoint-{epoch}.pth    every `save_every` epochs, the newest `keep_last` kept
output_dir/timm-last.pth, timm-{epoch}.pth   the encoder alone, in timm's layout (for fine-tuning)
output_dir/checkpoint-mid-epoch.pth  full state at a step boundary inside an epoch (on SIGTERM /
                                     SIGUSR1 or every `save_every_steps`), with the epoch's
                                     position; removed once a later epoch-end state is saved

A file that cannot be read is never overwritten: auto-resume either resumes from an older readable
one (the unreadable ones renamed `*.unreadable`, kept as evidence) or stops and says what to do.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from converters.io import NotACheckpoint, load_state, save_state
from converters.timm_format import encoder_state, to_timm
from spark_me import keep
from spark_me.engine import distributed
from spark_me.engine.distributed import DistEnv

log = logging.getLogger(__name__)

NUMBERED = re.compile(r"checkpoint-(\d+)\.pth$")
MID_EPOCH = "checkpoint-mid-epoch.pth"


class NoReadableCheckpoint(ValueError):
    """Auto-resume found checkpoints but could read none: continuing from epoch 0 would overwrite
    them (and the evidence of what went wrong), so the run stops with the ways out."""


def save(output_dir: Path, state: dict, epoch: int, numbered: bool, keep_last: int) -> Path:
    """`state` holds model/optimizer/scaler/epoch/step/config; writes the timm export beside it."""
    output_dir = Path(output_dir)
    config = state["config"]
    if config.get("model"):  # one's own module (--model): its own keys, no timm twin to check against
        timm_state = {k: v.detach().clone() for k, v in encoder_state(state["model"]).items()}
    else:
        timm_state = to_timm(state["model"], config["arch"], **config.get("model_kwargs", {}))
    names = ["last"] + ([f"{epoch:04d}"] if numbered else [])
    for name in names:
        save_state(state, output_dir / f"checkpoint-{name}.pth")
        save_state(timm_state, output_dir / f"timm-{name}.pth")
    if numbered and keep_last > 0:
        for old in sorted(numbered_checkpoints(output_dir))[:-keep_last]:
            old.unlink(missing_ok=True)
            (output_dir / old.name.replace("checkpoint-", "timm-")).unlink(missing_ok=True)
    drop_mid_epoch(output_dir)
    return output_dir / "checkpoint-last.pth"


def drop_mid_epoch(output_dir: Path) -> None:
    """Call once a later (epoch-end) state is saved: the mid-epoch one is superseded."""
    (Path(output_dir) / MID_EPOCH).unlink(missing_ok=True)


def save_mid_epoch(output_dir: Path, state: dict) -> Path:
    """A state at a step boundary inside an epoch (`state["position"]` says where); no timm export:
    timm-last.pth stays the encoder of the last finished epoch."""
    return save_state(state, Path(output_dir) / MID_EPOCH)


def numbered_checkpoints(output_dir: Path) -> list[Path]:
    return sorted(
        (p for p in Path(output_dir).glob("checkpoint-*.pth") if NUMBERED.search(p.name)),
        key=lambda p: int(NUMBERED.search(p.name)[1]),
    )


@dataclass
class Found:
    """What auto-resume found: the most advanced readable state (None: nothing to resume) and the
    checkpoints it could not read, with why."""

    path: Path | None = None
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def candidates(output_dir: Path) -> list[Path]:
    """Every checkpoint auto-resume considers: last, numbered, mid-epoch."""
    output_dir = Path(output_dir)
    names = [output_dir / "checkpoint-last.pth", *numbered_checkpoints(output_dir), output_dir / MID_EPOCH]
    return [p for p in names if p.is_file()]


def find_resumable(output_dir: Path) -> Found:
    """The checkpoint of the most advanced run state in output_dir (by optimiser step).

    Raises NoReadableCheckpoint when there are checkpoints but none can be read; nothing is
    changed on disk here (see `set_aside`).
    """
    found, best_step = Found(), -1
    files = candidates(output_dir)
    for path in files:
        try:
            step = int(load(path)["step"])
        except (ValueError, OSError, TypeError) as err:  # NotACheckpoint is a ValueError
            found.skipped.append((path, _why(path, err)))
            continue
        if step > best_step:
            found.path, best_step = path, step
    if files and found.path is None:
        listed = "; ".join(f"{p.name}: {why}" for p, why in found.skipped)
        raise NoReadableCheckpoint(
            f"auto-resume found no readable checkpoint in {output_dir} ({listed}); nothing was changed. "
            "Continue from a good copy with --resume FILE, start again from epoch 0 with --no_auto_resume "
            "(these files are then overwritten), or move them out of the folder"
        )
    return found


def _why(path: Path, err: BaseException) -> str:
    """The reason alone: NotACheckpoint messages start with the path, which the caller names."""
    text = str(err)
    return text.removeprefix(f"{path} ") or type(err).__name__


def set_aside(path: Path) -> Path:
    """Renames an unreadable checkpoint to `<name>.unreadable` (`.unreadable-2`, ... if taken), so a
    resumed run does not overwrite it; returns the new path."""
    return keep.set_aside(path, "unreadable")


def load(path: str | Path) -> dict:
    """A full pretraining state; any other file fails with a one-line `NotACheckpoint`."""
    state = load_state(path)
    missing = [k for k in ("model", "optimizer", "epoch", "step", "config") if k not in state]
    if missing:
        raise NotACheckpoint(
            f"{path} is not a full pretraining checkpoint (missing {', '.join(missing)}); "
            "to start from encoder weights use --init_weight"
        )
    return state


def resume_source(resume: str | None, auto_resume: bool, env: DistEnv, output_dir: Path) -> Found:
    """`resume` (--resume), else with `auto_resume` the most advanced readable checkpoint in
    output_dir, else nothing.

    Rank 0 decides and the others follow (they must not read a folder rank 0 is about to change).
    Nothing is changed here: when no checkpoint is readable this raises NoReadableCheckpoint, and
    the unreadable ones skipped for an older one (`skipped`, on rank 0) are set aside by
    `keep_unreadable`, which the run calls once it has passed every check.
    """
    if resume:
        return Found(Path(resume))
    if not auto_resume:
        return Found()
    found, error = Found(), None
    if env.is_main:
        try:
            found = find_resumable(output_dir)
        except NoReadableCheckpoint as err:
            error = str(err)
    path, error = distributed.from_main((str(found.path) if found.path else None, error), env)
    if error:
        raise NoReadableCheckpoint(error)
    return Found(Path(path) if path else None, found.skipped)


def keep_unreadable(found: Found) -> None:
    """Renames the checkpoints auto-resume skipped (`NAME.unreadable`): the resumed run would
    overwrite them, and with them the evidence of what went wrong."""
    for path, why in found.skipped:
        kept = set_aside(path)
        log.warning("skipped %s (%s): kept as %s; resuming from %s", path.name, why, kept.name, found.path)
