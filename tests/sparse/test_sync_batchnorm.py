"""Synchronised BatchNorm on 2 gloo processes holding different numbers of sites == one process
holding all of them: outputs, input and parameter gradients, running statistics."""

from __future__ import annotations

import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from spark_me.sparse.layers import SparseBatchNorm2d
from spark_me.sparse.sync_batchnorm import SyncBatchNorm2dRows, convert_sync_batchnorm, sync_batch_norm_rows

ROWS = (5, 11)  # per process: unequal, so the statistics must be count-weighted


def data():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(sum(ROWS), 4, generator=gen, dtype=torch.float64) * 3 + 7
    probe = torch.randn(sum(ROWS), 4, generator=gen, dtype=torch.float64)
    return x, probe


def make_bn() -> SparseBatchNorm2d:
    bn = SparseBatchNorm2d(4).double()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 1.5, 2.0, 0.7]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    return bn


def worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    x, probe = data()
    start = sum(ROWS[:rank])
    rows = x[start : start + ROWS[rank]].clone().requires_grad_(True)
    bn = convert_sync_batchnorm(nn.Sequential(make_bn()))[0]
    y = sync_batch_norm_rows(bn, rows, bn.sync_group)
    (y * probe[start : start + ROWS[rank]]).sum().backward()
    result = (y.detach(), rows.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var)
    torch.save(result, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_two_processes_equal_one_holding_all_sites(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    results = {r: torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)}

    x, probe = data()
    x.requires_grad_(True)
    bn = make_bn().train()
    y = nn.functional.batch_norm(
        x, bn.running_mean, bn.running_var, bn.weight, bn.bias, True, bn.momentum, bn.eps
    )
    (y * probe).sum().backward()
    got_y = torch.cat([results[0][0], results[1][0]])
    got_gx = torch.cat([results[0][1], results[1][1]])
    assert torch.allclose(got_y, y, atol=1e-12)
    assert torch.allclose(got_gx, x.grad, atol=1e-12)
    # DDP averages parameter gradients; their sum over processes is the single-process gradient
    assert torch.allclose(results[0][2] + results[1][2], bn.weight.grad, atol=1e-12)
    assert torch.allclose(results[0][3] + results[1][3], bn.bias.grad, atol=1e-12)
    for r in (0, 1):
        assert torch.allclose(results[r][4], bn.running_mean, atol=1e-12)
        assert torch.allclose(results[r][5], bn.running_var, atol=1e-12)
    # a local BN would differ: the test can tell
    local = nn.functional.batch_norm(x[: ROWS[0]], None, None, bn.weight, bn.bias, True, 0.1, bn.eps)
    assert not torch.allclose(local, got_y[: ROWS[0]], atol=1e-3)


def test_conversion_keeps_keys_and_leaves_single_process_runs_alone() -> None:
    model = nn.Sequential(make_bn(), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm2d(4)))
    keys = list(model.state_dict())
    convert_sync_batchnorm(model)
    assert list(model.state_dict()) == keys
    assert isinstance(model[1], SyncBatchNorm2dRows) and isinstance(model[2][0], SyncBatchNorm2dRows)
    assert model[0].sync_group is None
    x = torch.randn(2, 4, 3, 3)
    assert torch.allclose(
        model[1](x), nn.functional.batch_norm(x, None, None, model[1].weight, model[1].bias, True)
    )
