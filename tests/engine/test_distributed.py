"""DDP on the CPU with 2 gloo processes: gradients are the average of the ranks', and torchrun works
(and every rank ends the run with the same BatchNorm running statistics: synchronised BNs)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import spark_me

from .conftest import TINY_RUN


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model() -> spark_me.SparK:
    torch.manual_seed(0)
    return spark_me.SparK(spark_me.create_encoder("resnet18"), decoder_width=64)


def batch_for(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    images = torch.randn(2, 3, 64, 64, generator=gen)
    return images, spark_me.random_mask(2, 64, 64, 0.5, generator=gen)


def flat_grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    model = torch.nn.parallel.DistributedDataParallel(make_model())
    images, active = batch_for(rank)
    model(images, active).backward()
    torch.save(flat_grads(model.module), Path(out) / f"ddp-{rank}.pt")
    dist.destroy_process_group()


def test_ddp_gradients_agree_and_average(tmp_path: Path) -> None:
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    g0, g1 = (torch.load(tmp_path / f"ddp-{r}.pt") for r in (0, 1))
    assert torch.equal(g0, g1)  # every rank holds the same all-reduced gradient
    singles = []
    for rank in (0, 1):  # each rank's own gradient, without DDP
        model = make_model()
        model(*batch_for(rank)).backward()
        singles.append(flat_grads(model))
    expected = (singles[0] + singles[1]) / 2
    assert not torch.allclose(singles[0], singles[1])
    assert float((g0 - expected).abs().max() / expected.abs().max()) < 1e-4


def test_torchrun_two_processes(tmp_path: Path) -> None:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
        "-m",
        "tests.engine.pretrain_ranks",  # spark_me.cli, and each rank's BN statistics saved after
        "pretrain",
        "--output_dir",
        str(tmp_path),
        *TINY_RUN,
        "--epochs",
        "1",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "effective batch: 8 (4 per process x 1 accum x 2 processes)" in result.stderr
    rows = [json.loads(line) for line in (tmp_path / "log.txt").read_text().splitlines()]
    assert len(rows) == 1  # only rank 0 writes
    assert rows[0]["step"] == 12 // 8  # 12 training photographs, global batch 8, last partial batch dropped
    assert torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)["step"] == 1
    assert 0.0 < rows[0]["val_loss"] < 3.0  # rank 0 evaluates the held-out photographs
    # synchronised BNs: both ranks hold the same running statistics, which the step did move
    stats = [torch.load(tmp_path / f"rank{r}-bn-stats.pt") for r in (0, 1)]
    encoder = [n for n in stats[0] if n.startswith("encoder.")]
    assert len(encoder) >= 2 * 20 and stats[0].keys() == stats[1].keys()
    for name in stats[0]:
        assert torch.equal(stats[0][name], stats[1][name]), name
    moved = [n for n in encoder if "running_mean" in n and bool(stats[0][n].abs().max() > 0)]
    assert len(moved) == len(encoder) // 2
