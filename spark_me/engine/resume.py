"""Resuming a run (pretraining or fine-tuning) mid-epoch: what a pretraining checkpoint holds,
the saves made at step boundaries inside an epoch (every `--save_every_steps`, and on SIGTERM /
SIGUSR1), and the checks that a checkpoint can continue this run at all."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from torch import nn

from spark_me.engine import checkpoint, distributed
from spark_me.engine.config import PretrainConfig
from spark_me.engine.distributed import DistEnv
from spark_me.engine.epoch_position import EpochPosition, RankState, ResumableSampler
from spark_me.engine.preemption import PREEMPTED_EXIT, Preempted, StopRequest

log = logging.getLogger("spark_me.resume")


def full_state(model, optimizer, scaler, cfg: PretrainConfig, finished_epoch: int, step: int) -> dict:
    """What a checkpoint holds; `finished_epoch` is the index of the last finished epoch (-1: none)."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler else None,
        "epoch": finished_epoch,
        "step": step,
        "config": cfg.to_dict(),
    }


class MidEpochSaver:
    """Runs at every step boundary inside an epoch: saves the state every `every` steps (0: never),
    and when the processes agree to stop (a signal came), saves it and raises `Preempted`.

    `state_of(finished_epoch, step)` is the run's full state (what its epoch-end checkpoint holds);
    the saver adds the epoch's position. `sampler` is a ResumableSampler or ResumableRanks.
    """

    def __init__(
        self,
        every: int,
        env: DistEnv,
        output: Path,
        stop: StopRequest,
        state_of: Callable[[int, int], dict],
        sampler: ResumableSampler,
        layout: dict[str, int],
        epoch: int,
    ) -> None:
        self.every, self.env, self.output, self.stop = every, env, output, stop
        self.state_of, self.sampler, self.layout, self.epoch = state_of, sampler, layout, epoch

    def __call__(self, done: int, step: int, losses: list[float]) -> None:
        stopping = self.stop.agreed(self.env)
        if stopping or (self.every > 0 and step % self.every == 0):
            self.save(done, step, losses)
        if stopping:
            raise Preempted(
                f"stopped by {self.stop.name} in epoch {self.epoch + 1} after step {step}: the state is in "
                f"{self.output / checkpoint.MID_EPOCH}; run the same command to continue "
                f"(exit status {PREEMPTED_EXIT})"
            )

    def save(self, done: int, step: int, losses: list[float]) -> None:
        ranks = distributed.all_gather(RankState.capture(self.env.device, losses), self.env)
        if self.env.is_main:
            position = EpochPosition(self.epoch, done, self.sampler.epoch_order(), ranks, self.layout)
            state = self.state_of(self.epoch - 1, step)
            path = checkpoint.save_mid_epoch(self.output, {**state, "position": position.to_dict()})
            log.info("step %d (epoch %d, batch %d): saved %s", step, self.epoch + 1, done, path)
        distributed.barrier(self.env)


def stop_between_epochs(
    stop: StopRequest, env: DistEnv, epoch: int, epochs: int, step: int, output: Path
) -> None:
    """After epoch `epoch` was saved: raises `Preempted` when a signal came during validation or the
    save (every process calls it: a collective). Nothing to do after the last epoch."""
    if epoch + 1 < epochs and stop.agreed(env):
        raise Preempted(
            f"stopped by {stop.name} after epoch {epoch + 1} (step {step}): the state is in "
            f"{output / 'checkpoint-last.pth'}; run the same command to continue "
            f"(exit status {PREEMPTED_EXIT})"
        )


def position_of(
    state: dict | None, layout: dict[str, int], resume: Path, output: Path
) -> EpochPosition | None:
    """The mid-epoch position a resumed state holds (None: an epoch-end state). Refused in one line
    when the run is laid out differently (processes, batch size, ...): the position counts
    micro-batches of one layout and would skip the wrong samples in another."""
    position = EpochPosition.from_dict(state["position"]) if state and state.get("position") else None
    differ = position.mismatch(layout) if position else None
    if differ:
        raise ValueError(
            f"{resume} was saved inside epoch {position.epoch + 1} of a run laid out differently "
            f"({differ}): resume with the same settings, or from an epoch-end checkpoint "
            f"(--resume {output / 'checkpoint-last.pth'})"
        )
    return position


def refuse_foreign(path: Path, state: dict, model: nn.Module, arch: str, found_by_auto_resume: bool) -> None:
    """A checkpoint whose tensors do not fit this run's model (another --arch, or the same one with
    other --model_kwargs, decoder width, number of classes) is refused in one line, before anything
    is written; loading it would end in a size-mismatch traceback."""
    mine, saved = model.state_dict(), state["model"]
    differ = sorted(set(mine) ^ set(saved))
    differ += sorted(k for k in set(mine) & set(saved) if mine[k].shape != saved[k].shape)
    if not differ:
        return
    saved_arch = (state.get("config") or {}).get("arch", "an unrecorded architecture")
    if saved_arch != arch:
        what, way = (
            f"a {saved_arch} checkpoint, and this run is --arch {arch}",
            f"resume it with --arch {saved_arch}",
        )
    else:
        key = differ[0]
        shapes = (
            f"{tuple(saved[key].shape)} vs {tuple(mine[key].shape)}"
            if key in mine and key in saved
            else "absent"
        )
        what = f"a {arch} checkpoint made with other model settings ({key}: {shapes})"
        way = "resume it with the settings it was saved with (its config)"
    afresh = (
        "in another --output_dir (or with --no_auto_resume)" if found_by_auto_resume else "without --resume"
    )
    raise ValueError(
        f"{path} does not fit this run's model ({len(differ)} tensors differ): it is {what}; {way}, or start "
        f"this run afresh {afresh}"
    )
