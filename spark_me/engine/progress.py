"""An epoch's progress: a tqdm bar on a terminal, plain log lines anywhere else.

A tqdm bar redraws itself with carriage returns; in a redirected log (`spark-me pretrain ... >
log.txt 2>&1`, a cluster job's output file) every redraw stays in the file. So the bar is drawn
only when its stream is a terminal; otherwise a long epoch logs one line at each tenth of the way
that comes at least `min_interval` seconds after the previous line (a short epoch logs nothing but
the caller's per-epoch line).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any

from tqdm import tqdm

log = logging.getLogger(__name__)


def is_terminal(stream: IO[str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class LoggedProgress:
    """The non-terminal stand-in for a tqdm bar: the same iteration and `set_postfix`, and a log
    line ("epoch 2/10: 40 % (400/1000), loss=0.4312, lr=1.5e-04") at each tenth of `total` that
    comes `min_interval` seconds or more after the previous one."""

    def __init__(
        self, iterable: Iterable, total: int, desc: str, initial: int = 0, min_interval: float = 30.0
    ):
        self.iterable, self.total, self.desc, self.initial = iterable, total, desc, initial
        self.min_interval = min_interval
        self.postfix: dict[str, Any] = {}

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def __iter__(self) -> Iterator:
        marks = sorted({math.ceil(self.total * k / 10) for k in range(1, 10)})
        last = time.monotonic()
        done = self.initial
        for item in self.iterable:
            yield item  # the caller's loop body runs here, including its set_postfix
            done += 1
            if done in marks and time.monotonic() - last >= self.min_interval:
                last = time.monotonic()
                extra = "".join(f", {k}={v}" for k, v in self.postfix.items())
                log.info("%s: %d %% (%d/%d)%s", self.desc, 100 * done // self.total, done, self.total, extra)


def progress(
    iterable: Iterable,
    total: int,
    desc: str,
    enabled: bool = True,
    initial: int = 0,
    stream: IO[str] | None = None,
    min_interval: float = 30.0,
) -> tqdm | LoggedProgress:
    """Iterate `iterable` showing progress on `stream` (default: stderr, where logging writes):
    a tqdm bar when it is a terminal, else `LoggedProgress` lines; nothing when not `enabled`
    (a process other than the main one)."""
    stream = sys.stderr if stream is None else stream
    if enabled and not is_terminal(stream):
        return LoggedProgress(iterable, total, desc, initial, min_interval)
    return tqdm(
        iterable,
        total=total,
        initial=initial,
        desc=desc,
        file=stream,
        disable=not enabled,
        leave=False,
        dynamic_ncols=True,
    )
