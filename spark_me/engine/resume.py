"""Resuming pretraining mid-epoch: what a checkpoint holds, and the saves made at step
boundaries inside an epoch (every `--save_every_steps`, and on SIGTERM / SIGUSR1)."""

from __future__ import annotations

import logging
from pathlib import Path

from spark_me.engine import checkpoint, distributed
from spark_me.engine.config import PretrainConfig
from spark_me.engine.distributed import DistEnv
from spark_me.engine.epoch_position import EpochPosition, RankState, ResumableSampler
from spark_me.engine.preemption import PREEMPTED_EXIT, Preempted, StopRequest

log = logging.getLogger("spark_me.pretrain")


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
    """Runs at every step boundary inside an epoch: saves the state every `save_every_steps` steps,
    and when the processes agree to stop (a signal came), saves it and raises `Preempted`."""

    def __init__(
        self,
        cfg: PretrainConfig,
        env: DistEnv,
        output: Path,
        stop: StopRequest,
        model,
        optimizer,
        scaler,
        sampler: ResumableSampler,
        layout: dict[str, int],
        epoch: int,
    ) -> None:
        self.cfg, self.env, self.output, self.stop = cfg, env, output, stop
        self.model, self.optimizer, self.scaler, self.sampler = model, optimizer, scaler, sampler
        self.layout, self.epoch = layout, epoch

    def __call__(self, done: int, step: int, losses: list[float]) -> None:
        stopping = self.stop.agreed(self.env)
        every = self.cfg.save_every_steps
        if stopping or (every > 0 and step % every == 0):
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
            state = full_state(self.model, self.optimizer, self.scaler, self.cfg, self.epoch - 1, step)
            path = checkpoint.save_mid_epoch(self.output, {**state, "position": position.to_dict()})
            log.info("step %d (epoch %d, batch %d): saved %s", step, self.epoch + 1, done, path)
        distributed.barrier(self.env)
