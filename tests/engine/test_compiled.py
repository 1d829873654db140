"""`spark-me pretrain --compile`: the log line of the compile time, checkpoints that any run can
resume (with or without --compile), bad backends refused in one line.

The runs compile with aot_eager (dynamo and AOT autograd as with inductor, no code generation) to
stay fast; that inductor's code computes the same step is tests/models/test_spark_compiled.py.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch

from spark_me import cli
from spark_me.engine.config import resolve
from spark_me.engine.pretrain import build_model

from .conftest import TINY_RUN

COMPILED = ["--compile", "--compile_backend", "aot_eager"]
LINE = re.compile(
    r"compiled the dense stages \(mask-token fill and projections, decoder, loss\) with aot_eager: "
    r"(\d+\.\d) s"
)


def run(out: Path, *extra: str) -> int:
    """A run as in a new process: dynamo forgets the graphs compiled by an earlier run of this
    one (it would reuse them, compiling nothing)."""
    torch._dynamo.reset()
    return cli.main(["pretrain", "--output_dir", str(out), *TINY_RUN, "--val_every", "0", *extra])


def test_resume_with_and_without_compile(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Epoch 1 compiled, epoch 2 eager from its checkpoint, epoch 3 compiled again from that one:
    every checkpoint holds the eager model's keys, and each run resumes where the last stopped."""
    caplog.set_level(logging.INFO, logger="spark_me")
    assert run(tmp_path, "--epochs", "1", *COMPILED) == 0
    seconds = [float(s) for s in LINE.findall(caplog.text)]
    assert len(seconds) == 1 and seconds[0] > 0  # one line: what was compiled, in how many seconds
    keys = list(build_model(resolve([*TINY_RUN])).state_dict())
    for epoch, extra in ((2, []), (3, COMPILED)):
        state = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
        assert list(state["model"]) == keys and state["epoch"] == epoch - 2
        caplog.clear()
        assert run(tmp_path, "--epochs", str(epoch), *extra) == 0
        assert f"resumed from {tmp_path / 'checkpoint-last.pth'}: epoch {epoch}" in caplog.text
        assert len(LINE.findall(caplog.text)) == (1 if extra else 0)
    state = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    assert list(state["model"]) == keys and state["epoch"] == 2 and state["step"] == 9


def test_compile_is_off_by_default_and_a_bad_backend_is_refused(tmp_path: Path, caplog) -> None:
    assert resolve([]).compile is False and resolve(["--compile"]).compile_backend == "inductor"
    config = tmp_path / "c.yaml"
    config.write_text("compile: true\ncompile_backend: tvm\n")
    assert cli.main(["pretrain", "--config", str(config), "--output_dir", str(tmp_path / "o")]) == 1
    assert "--compile_backend 'tvm': must be one of inductor, aot_eager, eager" in caplog.text
    assert not (tmp_path / "o").exists()
