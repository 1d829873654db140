"""A progress bar only on a terminal: redirected output (a log file) gets no carriage-return redraws,
only plain log lines; a terminal still gets tqdm's bar."""

from __future__ import annotations

import io
import logging

import pytest
import torch

from spark_me.engine.progress import progress

from .test_pretrain import ToyLoss, toy_epochs


class Terminal(io.StringIO):
    """A stream that says it is a terminal (what tqdm draws on)."""

    def isatty(self) -> bool:
        return True


def run(stream: io.StringIO, total: int = 20, enabled: bool = True, initial: int = 0) -> list[int]:
    bar = progress(
        range(initial, total), total=total, desc="epoch 1/2", enabled=enabled, initial=initial, stream=stream,
        min_interval=0.0,
    )  # fmt: skip
    seen = []
    for i in bar:
        seen.append(i)
        bar.set_postfix(loss=f"{1 / (i + 1):.4f}")
    return seen


def test_a_file_gets_log_lines_not_a_bar(caplog: pytest.LogCaptureFixture) -> None:
    stream = io.StringIO()
    with caplog.at_level(logging.INFO, logger="spark_me.engine.progress"):
        assert run(stream) == list(range(20))
    assert stream.getvalue() == ""  # no '\r'-redrawn bar, nothing at all on the stream
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "epoch 1/2: 10 % (2/20), loss=0.5000" and len(lines) == 9
    assert lines[-1] == "epoch 1/2: 90 % (18/20), loss=0.0556"


def test_a_resumed_epoch_counts_from_where_it_starts(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="spark_me.engine.progress"):
        assert run(io.StringIO(), initial=15) == list(range(15, 20))
    marks = [r.getMessage().split(",")[0] for r in caplog.records]
    assert marks == ["epoch 1/2: 80 % (16/20)", "epoch 1/2: 90 % (18/20)"]


def test_a_terminal_gets_the_bar(caplog: pytest.LogCaptureFixture) -> None:
    stream = Terminal()
    with caplog.at_level(logging.INFO, logger="spark_me.engine.progress"):
        assert run(stream) == list(range(20))
    assert "\r" in stream.getvalue() and "epoch 1/2:   0%|" in stream.getvalue()  # tqdm redraws with \r
    assert not caplog.records


@pytest.mark.parametrize("stream", [io.StringIO(), Terminal()], ids=["file", "terminal"])
def test_other_ranks_show_nothing(stream: io.StringIO, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="spark_me.engine.progress"):
        assert run(stream, enabled=False) == list(range(20))
    assert stream.getvalue() == "" and not caplog.records


def test_a_pretraining_epoch_into_a_file_draws_no_bar(capsys: pytest.CaptureFixture, gen) -> None:
    """pretrain.train_one_epoch with stderr redirected (pytest's capture is not a terminal)."""
    import sys

    assert not sys.stderr.isatty()
    toy_epochs(ToyLoss(), [[torch.randn(2, 7, generator=gen, dtype=torch.float64) for _ in range(4)]], 1)
    err = capsys.readouterr().err
    assert "\r" not in err and "epoch 1/1" not in err
