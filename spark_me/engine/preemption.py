"""Stopping on a cluster's request (SIGTERM, or SIGUSR1 sent ahead of it) without losing the epoch.

Schedulers end a job by sending SIGTERM (SLURM: SIGTERM, then SIGKILL after KillWait; with
`--signal=USR1@N`, SIGUSR1 N seconds earlier) and killing it a little later. The handler only
records that a signal came: stopping in the middle of a backward pass, or saving from inside a
signal handler, could leave half-updated state. At every optimiser-step boundary the processes
agree (one all-reduce of a flag: stop when any of them was signalled, so that a signal reaching
only some nodes still stops every rank at the same step), the main process writes a mid-epoch
checkpoint and every process exits with `PREEMPTED_EXIT`.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from spark_me.engine import distributed
from spark_me.engine.distributed import DistEnv

# sysexits.h EX_TEMPFAIL, "temporary failure, the user is invited to retry": the state is saved and
# the same command continues the run. A job script can requeue on it (`[ $? -eq 75 ] && requeue`).
PREEMPTED_EXIT = 75

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class NonFiniteLoss(RuntimeError):
    """A NaN / inf loss: the run stops and keeps its last good checkpoint."""


class Preempted(Exception):
    """Raised at a step boundary once the processes agreed to stop (after the state was saved)."""


class StopRequest:
    """Records SIGTERM / SIGUSR1 while installed (a context manager; the previous handlers come back
    on exit). Installing needs the main thread; elsewhere (a run started from a thread) it is a no-op
    and the run simply cannot be stopped by a signal."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum  # nothing else here: the training loop acts at its next step boundary

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "a stop request"

    def agreed(self, env: DistEnv) -> bool:
        """True on every process when any process has been signalled (a collective: every process
        must call it at the same point)."""
        return distributed.any_true(self.signum is not None, env)


def guarded_run(env: DistEnv, output: Path, log: logging.Logger, body: Callable[[StopRequest], int]) -> int:
    """Run a training `body` with the stop signals caught: 0 when it finishes, 1 on a non-finite
    loss (the last good checkpoint is kept), PREEMPTED_EXIT when stopped by SIGTERM / SIGUSR1;
    the process group is torn down either way. Shared by pretraining and fine-tuning."""
    with StopRequest() as stop:
        try:
            return body(stop)
        except NonFiniteLoss as err:
            log.error(
                "%s: stopping. The last good checkpoint is kept: %s", err, output / "checkpoint-last.pth"
            )
            return 1
        except Preempted as err:
            if env.is_main:
                log.warning("%s", err)
            return PREEMPTED_EXIT
        finally:
            distributed.cleanup(env)
