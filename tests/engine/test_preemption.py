"""SIGTERM in the middle of an epoch: the step in flight is finished, a mid-epoch checkpoint is
written, the run exits with PREEMPTED_EXIT, and the same command then ends with exactly the weights,
optimiser state and log of a run that was never interrupted (bit for bit: see `test_sigterm_...`).

The signal is a real SIGTERM sent by the process to itself from inside the forward pass of a chosen
micro-batch (a counting wrapper around SparK.forward, in a script run as its own process), so it
always lands at the same point of the run: a test that sent it from outside after a delay would
land anywhere, or after the run had finished.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import spark_me
from spark_me import cli
from spark_me.engine import checkpoint
from spark_me.engine.preemption import PREEMPTED_EXIT, StopRequest

from .conftest import TINY_RUN
from .test_distributed import free_port

pytestmark = pytest.mark.heavy  # whole commands in child processes: scheduled first (conftest)

# 12 photographs x 2 = 24 samples: 6 batches of 4 an epoch; the dataflow choice is fixed (rules)
# because measured choices may differ between two processes, and so would the rounding
RUN = [*TINY_RUN, "--repeat", "2", "--epochs", "2", "--dataflow", "rules", "--lr", "2e-3",
       "--val_every", "0", "--recon_every", "100", "--save_every", "0"]  # fmt: skip

# SIGTERM_IN: the model class whose training forwards are counted ("module:Class"; default SparK)
SIGTERM_AT = textwrap.dedent(
    """
    import importlib, os, signal, sys

    module, name = os.environ.get("SIGTERM_IN", "spark_me.models.spark:SparK").split(":")
    SparK = getattr(importlib.import_module(module), name)
    at, calls, forward = int(os.environ["SIGTERM_AT"]), [0], SparK.forward

    def counting(self, *args, **kwargs):
        if self.training:
            calls[0] += 1
            if calls[0] == at and os.environ.get("RANK", "0") == "0":
                os.kill(os.getpid(), signal.SIGTERM)  # lands in this micro-batch's forward pass
        return forward(self, *args, **kwargs)

    SparK.forward = counting
    from spark_me import cli

    sys.exit(cli.main(sys.argv[1:]))
    """
)


def read_log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.txt").read_text().splitlines()]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_state(got: dict, want: dict) -> None:
    """Model and optimiser tensors equal bit for bit, the step the same."""
    assert got["step"] == want["step"] and got["epoch"] == want["epoch"]
    for key, value in want["model"].items():
        assert torch.equal(got["model"][key], value), key
    for pid, slot in want["optimizer"]["state"].items():
        for name, value in slot.items():
            other = got["optimizer"]["state"][pid][name]
            assert torch.equal(torch.as_tensor(other), torch.as_tensor(value)), f"optimizer {pid} {name}"


def assert_same_log(got: list[dict], want: list[dict]) -> None:
    keys = ("epoch", "step", "train_loss", "lr", "weight_decay")
    assert [[r[k] for k in keys] for r in got] == [[r[k] for k in keys] for r in want]


@pytest.fixture
def one_thread():
    """Same thread count in this process as in the child (OMP_NUM_THREADS=1): sums of floats are
    then done in the same order by both, so the weights can be compared bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield child_env()
    torch.set_num_threads(before)


def child_env(**extra: str) -> dict[str, str]:
    """One thread, and this checkout's spark_me first on the path (a script's own folder, not the
    working directory, is what Python puts there)."""
    root = str(Path(spark_me.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path, **extra)


def test_sigterm_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path: Path, one_thread) -> None:
    """--accum_iter 2 (3 steps an epoch), 2 DataLoader workers. SIGTERM arrives in the forward of
    the 9th micro-batch: epoch 2, the first micro-batch of its step 2 (step 5 of the run). Both
    micro-batches of that step are finished, the state after step 5 is saved, exit 75; the resumed
    run then equals the uninterrupted one exactly (torch.equal on every tensor): the order of the
    remaining samples, each sample's augmentation (seeded by its index, whatever worker loads it)
    and every process's random state (masks, drop-path) are those the uninterrupted run had."""
    flags = [*RUN, "--accum_iter", "2", "--num_workers", "2"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    # every run in a child with the same environment: oneDNN keeps the thread pool it started with,
    # so an in-process run under a 2-thread pytest sums in another order than a 1-thread child
    pretrain = [sys.executable, "-m", "spark_me.cli", "pretrain", *flags]
    run_straight = subprocess.run([*pretrain, "--output_dir", str(straight)], env=one_thread, timeout=600)
    assert run_straight.returncode == 0

    script = tmp_path / "sigterm_at.py"
    script.write_text(SIGTERM_AT)
    env = dict(one_thread, SIGTERM_AT="9")
    argv = [sys.executable, str(script), "pretrain", "--output_dir", str(killed), *flags]
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == PREEMPTED_EXIT, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "stopped by SIGTERM in epoch 2 after step 5" in result.stderr
    mid = load(killed / checkpoint.MID_EPOCH)
    assert (mid["step"], mid["epoch"]) == (5, 0)  # the step in flight was finished, nothing more
    assert (mid["position"]["epoch"], mid["position"]["batch"]) == (1, 4)
    assert load(killed / "checkpoint-last.pth")["step"] == 3  # epoch 1's end is kept as it was
    assert [r["epoch"] for r in read_log(killed)] == [1]

    resumed = subprocess.run([*pretrain, "--output_dir", str(killed)], env=one_thread, timeout=600)
    assert resumed.returncode == 0
    assert not (killed / checkpoint.MID_EPOCH).exists()  # superseded by the epoch-end state
    assert_same_log(read_log(killed), read_log(straight))
    want, got = load(straight / "checkpoint-last.pth"), load(killed / "checkpoint-last.pth")
    assert any(not torch.equal(got["model"][k], mid["model"][k]) for k in mid["model"])  # it moved since
    assert_same_state(got, want)


class Crash(Exception):
    """A process that ends without warning (power, OOM killer, SIGKILL): no handler runs."""


def fail_at(monkeypatch, forward_number: int, action) -> None:
    """Calls `action()` in the forward pass of the `forward_number`-th training micro-batch."""
    from spark_me.models.spark import SparK

    calls, forward = [0], SparK.forward

    def counting(self, *args, **kwargs):
        calls[0] += self.training
        if calls[0] == forward_number and self.training:
            action()
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(SparK, "forward", counting)


def test_save_every_steps_writes_a_resumable_mid_epoch_state(tmp_path: Path, one_thread, monkeypatch) -> None:
    """--save_every_steps 2 over 2 epochs of 6 steps: mid-epoch saves at steps 2, 4 (epoch 1) and
    8, 10 (epoch 2; step 6 and 12 are epoch ends). A run that dies without warning in step 10
    resumes from step 8 and ends exactly like an uninterrupted run."""
    flags = [*RUN, "--save_every_steps", "2"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert cli.main(["pretrain", "--output_dir", str(straight), *flags]) == 0
    assert not (straight / checkpoint.MID_EPOCH).exists()  # removed by the last epoch-end save
    with monkeypatch.context() as patch:
        fail_at(patch, 10, lambda: (_ for _ in ()).throw(Crash()))
        with pytest.raises(Crash):
            cli.main(["pretrain", "--output_dir", str(killed), *flags])
    mid = load(killed / checkpoint.MID_EPOCH)
    assert (mid["step"], mid["position"]["epoch"], mid["position"]["batch"]) == (8, 1, 2)
    assert cli.main(["pretrain", "--output_dir", str(killed), *flags]) == 0
    assert_same_log(read_log(killed), read_log(straight))
    assert_same_state(load(killed / "checkpoint-last.pth"), load(straight / "checkpoint-last.pth"))


def test_torchrun_sigterm_on_rank_0_stops_both_ranks_at_the_same_step(tmp_path: Path) -> None:
    """2 gloo processes (global batch 8: 3 steps an epoch). Only rank 0 receives SIGTERM, in the
    forward of its 5th micro-batch (epoch 2, step 5 in flight): the all-reduced flag stops rank 1
    after the same step, both exit 75, rank 0 saves the state with both ranks' random states. The
    resumed 2-process run ends with the uninterrupted 2-process run's weights, bit for bit."""
    env = child_env(SIGTERM_AT="5")
    script = tmp_path / "sigterm_at.py"
    script.write_text(SIGTERM_AT)

    def torchrun(output: Path, *launch: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), *launch, "pretrain", "--output_dir", str(output), *RUN]  # fmt: skip
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert torchrun(straight, "-m", "spark_me.cli").returncode == 0
    stopped = torchrun(killed, str(script))
    assert stopped.returncode != 0
    # torchrun reports the first worker to exit (it then SIGTERMs the other, which may be exiting
    # already): one 75 is visible; that both ranks stopped after the same step shows in the state
    # below (rank 1's random state reached rank 0 through an all-gather at that step boundary)
    assert f"exitcode: {PREEMPTED_EXIT}" in stopped.stderr.replace("  :", ":"), stopped.stderr[-4000:]
    assert "stopped by SIGTERM in epoch 2 after step 5" in stopped.stderr
    mid = load(killed / checkpoint.MID_EPOCH)
    assert (mid["step"], mid["position"]["batch"], mid["position"]["layout"]["world_size"]) == (5, 2, 2)
    assert len(mid["position"]["ranks"]) == 2
    assert not torch.equal(mid["position"]["ranks"][0]["rng_cpu"], mid["position"]["ranks"][1]["rng_cpu"])
    resumed = torchrun(killed, "-m", "spark_me.cli")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "batch 2 of the epoch, step 5" in resumed.stderr
    assert_same_log(read_log(killed), read_log(straight))
    assert_same_state(load(killed / "checkpoint-last.pth"), load(straight / "checkpoint-last.pth"))


def test_a_mid_epoch_state_refuses_a_different_layout(tmp_path: Path, caplog, monkeypatch) -> None:
    """The position counts micro-batches of a given size on a given number of processes: resumed
    with another batch size it would skip the wrong samples, so it is refused in one line. (The
    SIGTERM is sent in this process: cli.main returns the exit status.)"""
    flags = [*RUN, "--epochs", "1"]
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        fail_at(patch, 3, lambda: os.kill(os.getpid(), signal.SIGTERM))
        assert cli.main(["pretrain", "--output_dir", str(out), *flags]) == PREEMPTED_EXIT
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler was taken away again
    before = (out / checkpoint.MID_EPOCH).read_bytes()
    assert cli.main(["pretrain", "--output_dir", str(out), *flags, "--batch_size", "2"]) == 1
    assert "batch_size 4 -> 2" in caplog.text and "--resume" in caplog.text
    assert (out / checkpoint.MID_EPOCH).read_bytes() == before


def test_stop_request_only_records_the_signal() -> None:
    """The handler sets a flag and nothing else; the previous handler comes back afterwards."""
    before = signal.getsignal(signal.SIGUSR1)
    with StopRequest() as stop:
        assert stop.signum is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.signum == signal.SIGUSR1 and stop.name == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before
