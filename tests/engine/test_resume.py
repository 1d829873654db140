"""Mid-epoch resume (engine/resume.py) for fine-tuning: a SIGTERM mid-epoch loses only the step in
flight and the resumed run ends with the uninterrupted run's weights, EMA weights and optimiser
state bit for bit, with Mixup/CutMix on (their draws come from numpy's global random state, which
the mid-epoch state must carry); and a checkpoint of another architecture is refused in one line.
(Pretraining's side of the same machinery: test_preemption.py, whose harness this reuses.)

The data: 4 colour classes, 8 training images each at 16 px, input 32 px, batch 8: 4 steps an
epoch; ResNet-18 with SparK's ResNet recipe (Mixup 0.1 + CutMix 1.0, label smoothing, EMA, drop
path, LAMB), each run a couple of seconds.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from timm.models.resnet import ResNet

from spark_me import cli
from spark_me.engine import checkpoint
from spark_me.engine.preemption import PREEMPTED_EXIT
from tests._labelled import make_labelled_set

from .test_distributed import free_port
from .test_preemption import SIGTERM_AT, Crash, assert_same_state, child_env, load, one_thread, read_log

pytestmark = pytest.mark.heavy  # whole commands in child processes: scheduled first (conftest)

__all__ = ["one_thread"]  # a fixture used below

FAST = ["--arch", "resnet18", "--input_size", "32", "--batch_size", "8", "--epochs", "2",
        "--warmup_epochs", "1", "--blr", "0.4"]  # fmt: skip
LOGGED = ("epoch", "step", "train_loss", "lr", "val_loss", "val_top1", "ema_val_top1", "best_top1")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_labelled_set(tmp_path_factory.mktemp("labelled"), train_per_class=8, val_per_class=2, size=16)


def finetune(data: Path, out: Path, *extra: str) -> int:
    return cli.main(["finetune", "--data_path", str(data), "--output_dir", str(out), *FAST, *extra])


def at_training_forward(monkeypatch, number: int, action) -> None:
    """Calls `action()` in the forward pass of the `number`-th training micro-batch."""
    calls, forward = [0], ResNet.forward

    def counting(self, *args, **kwargs):
        calls[0] += self.training
        if calls[0] == number and self.training:
            action()
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(ResNet, "forward", counting)


def as_a_new_process() -> None:
    """The runs share this process: without this, the killed run's last random states would still
    be in place when the resumed one starts, and a resume that forgot to restore one would pass."""
    np.random.seed(None)  # from the OS's entropy, as a new process's
    random.seed(None)
    torch.seed()


def assert_same_run(got: Path, want: Path) -> None:
    """log.txt, model, optimiser and EMA of two finished runs are equal bit for bit."""
    assert [[r[k] for k in LOGGED] for r in read_log(got)] == [[r[k] for k in LOGGED] for r in read_log(want)]
    a, b = load(got / "checkpoint-last.pth"), load(want / "checkpoint-last.pth")
    assert_same_state(a, b)
    assert a["ema"].keys() == b["ema"].keys()
    for key, value in b["ema"].items():
        assert torch.equal(a["ema"][key], value), f"ema {key}"
    assert a["best"] == b["best"]


def test_sigterm_mid_epoch_then_resume_equals_an_uninterrupted_run(
    data: Path, tmp_path: Path, one_thread
) -> None:
    """2 DataLoader workers. SIGTERM arrives in the forward of the 7th micro-batch (epoch 2, its
    3rd step): that step is finished, the state after step 7 saved, exit 75, epoch 1's end kept. The
    same command then takes step 8 exactly as the uninterrupted run did: the sample order, each
    sample's augmentation, the Mixup/CutMix draws (numpy), drop path (torch), the EMA."""
    flags = ["--num_workers", "2"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert finetune(data, straight, *flags) == 0
    with pytest.MonkeyPatch.context() as patch:
        at_training_forward(patch, 7, lambda: os.kill(os.getpid(), signal.SIGTERM))
        assert finetune(data, killed, *flags) == PREEMPTED_EXIT
    mid = load(killed / checkpoint.MID_EPOCH)
    assert (mid["step"], mid["epoch"], mid["position"]["epoch"], mid["position"]["batch"]) == (7, 0, 1, 3)
    assert mid["ema"] is not None and "rng_numpy" in mid["position"]["ranks"][0]
    assert load(killed / "checkpoint-last.pth")["step"] == 4 and [r["epoch"] for r in read_log(killed)] == [1]
    as_a_new_process()
    assert finetune(data, killed, *flags) == 0
    assert not (killed / checkpoint.MID_EPOCH).exists()  # superseded by the epoch-end state
    assert any(
        not torch.equal(load(killed / "checkpoint-last.pth")["model"][k], v) for k, v in mid["model"].items()
    )
    assert_same_run(killed, straight)


def test_save_every_steps_with_repeated_augmentation(data: Path, tmp_path: Path, one_thread) -> None:
    """--save_every_steps 3 with timm's RepeatAugSampler (--rep_aug 3): a run that dies without
    warning in step 7 resumes from the state saved after step 6 (epoch 2, batch 2) and ends like an
    uninterrupted run."""
    flags = ["--num_workers", "0", "--rep_aug", "3", "--save_every_steps", "3"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert finetune(data, straight, *flags) == 0
    with pytest.MonkeyPatch.context() as patch:
        at_training_forward(patch, 7, lambda: (_ for _ in ()).throw(Crash()))
        with pytest.raises(Crash):
            finetune(data, killed, *flags)
    mid = load(killed / checkpoint.MID_EPOCH)
    assert (mid["step"], mid["position"]["epoch"], mid["position"]["batch"]) == (6, 1, 2)
    assert mid["position"]["order"].shape == (1, 32)  # every process's share of the repeated order
    as_a_new_process()
    assert finetune(data, killed, *flags) == 0
    assert_same_run(killed, straight)


def test_torchrun_sigterm_on_rank_0_stops_both_ranks_at_the_same_step(data: Path, tmp_path: Path) -> None:
    """2 gloo processes, batch 8 each (2 steps an epoch): SIGTERM reaches
    rank 0 alone in the forward of its 3rd micro-batch (epoch 2, step 3 in flight); both ranks stop
    after that step, and the resumed 2-process run ends with the uninterrupted one's weights."""
    env = child_env(SIGTERM_AT="3", SIGTERM_IN="timm.models.resnet:ResNet")
    script = tmp_path / "sigterm_at.py"
    script.write_text(SIGTERM_AT)

    def torchrun(out: Path, *launch: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), *launch, "finetune", "--data_path", str(data), "--output_dir", str(out),
               *FAST, "--batch_size", "8", "--num_workers", "0"]  # fmt: skip
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = torchrun(straight, "-m", "spark_me.cli")
    assert done.returncode == 0, done.stderr[-3000:]
    stopped = torchrun(killed, str(script))
    assert f"exitcode: {PREEMPTED_EXIT}" in stopped.stderr.replace("  :", ":"), stopped.stderr[-4000:]
    assert "stopped by SIGTERM in epoch 2 after step 3" in stopped.stderr
    mid = load(killed / checkpoint.MID_EPOCH)
    assert (mid["step"], mid["position"]["batch"], len(mid["position"]["ranks"])) == (3, 1, 2)
    resumed = torchrun(killed, "-m", "spark_me.cli")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "batch 1 of the epoch, step 3" in resumed.stderr
    assert_same_run(killed, straight)


def test_a_checkpoint_of_another_arch_is_refused_in_one_line(data: Path, tmp_path: Path, caplog) -> None:
    """--resume of a resnet34 fine-tuning checkpoint in a resnet18 run: one line naming both and
    the way out, before anything is written (a size-mismatch traceback before)."""
    other = tmp_path / "other"
    assert (
        finetune(
            data, other, "--arch", "resnet34", "--epochs", "1", "--warmup_epochs", "0", "--num_workers", "0"
        )
        == 0
    )
    out = tmp_path / "out"
    out.mkdir()
    caplog.clear()
    assert finetune(data, out, "--resume", str(other / "checkpoint-last.pth"), "--num_workers", "0") == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert "it is a resnet34 checkpoint, and this run is --arch resnet18" in errors[0]
    assert "resume it with --arch resnet34" in errors[0]
    assert not any(out.iterdir())
