"""Synchronised BatchNorm on 2 gloo processes holding different numbers of sites == one process
holding all of them: outputs, input and parameter gradients, running statistics; for the function
alone and through the layers of a sparse encoder converted by `convert_sync_batchnorm` under DDP."""

from __future__ import annotations

import socket
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import spark_me
from spark_me.sparse.layers import SparseBatchNorm2d
from spark_me.sparse.sync_batchnorm import SyncBatchNorm2dRows, convert_sync_batchnorm, sync_batch_norm_rows

from .._fixtures import randomize

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


def rows_worker(rank: int, out: str) -> None:
    x, probe = data()
    start = sum(ROWS[:rank])
    rows = x[start : start + ROWS[rank]].clone().requires_grad_(True)
    bn = convert_sync_batchnorm(nn.Sequential(make_bn()))[0]
    y = sync_batch_norm_rows(bn, rows, bn.sync_group)
    (y * probe[start : start + ROWS[rank]]).sum().backward()
    result = (y.detach(), rows.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var)
    torch.save(result, Path(out) / f"rank{rank}.pt")


def worker(rank: int, port: int, out: str) -> None:
    """Both 2-process runs in one spawn (starting processes is what costs)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    rows_worker(rank, out)
    encoder_worker(rank, out)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder where 2 gloo processes saved their results (rank{r}.pt, {encoder kind}{r}.pt)."""
    out = tmp_path_factory.mktemp("sync_bn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port, str(out)), nprocs=2, join=True)
    return out


def test_two_processes_equal_one_holding_all_sites(two_processes: Path) -> None:
    results = {r: torch.load(two_processes / f"rank{r}.pt") for r in (0, 1)}

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


# -- through the layers: small sparse ResNets under DDP -------------------------------------------

ENCODERS = ("hand-written", "generic")  # spark-me's SparseResNet, and timm's ResNet run generically


def make_encoder(kind: str) -> nn.Module:
    torch.manual_seed(0)
    encoder = spark_me.create_encoder("resnet18", "rules", generic=kind == "generic", layers=(1, 1, 1, 1))
    randomize(encoder, torch.Generator().manual_seed(1))  # BN weights away from 0/1, stats away from 0/1
    return encoder.double().train()


def encoder_data() -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Two 64x96 images (one per process), 5 and 2 of their 6 cells visible, and output probes."""
    gen = torch.Generator().manual_seed(4)
    images = torch.randn(2, 3, 64, 96, generator=gen, dtype=torch.float64)
    active = torch.tensor([[[1, 1, 1], [1, 0, 1]], [[0, 1, 0], [0, 0, 1]]], dtype=torch.bool)
    probes = [torch.randn(2, c, 64 // s, 96 // s, generator=gen, dtype=torch.float64) for c, s in
              zip((64, 128, 256, 512), (4, 8, 16, 32), strict=True)]  # fmt: skip
    return images, active, probes


def encoder_step(model: nn.Module, encoder: nn.Module, images, active, probes) -> dict:
    """One train-mode forward/backward: the maps, the sparse BNs' outputs [N, C] by name (those of
    the hand-written encoder), input and parameter gradients, running statistics."""
    outputs, folded = {}, {}
    names = {m: name for name, m in encoder.named_modules() if isinstance(m, SparseBatchNorm2d)}
    hooks = [
        m.register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o.F.detach().clone()))
        for m, name in names.items()
    ]
    relu_prologue = SparseBatchNorm2d.relu_prologue

    def recorded(bn, x):  # a BN folded into the next op (bn_relu.py): its statistics
        prologue = relu_prologue(bn, x)
        folded[names[bn]] = torch.cat([prologue.mean, prologue.invstd])
        return prologue

    images = images.clone().requires_grad_(True)
    with mock.patch.object(SparseBatchNorm2d, "relu_prologue", recorded):
        maps = model(images, active)
    sum((m * p).sum() for m, p in zip(maps, probes, strict=True)).backward()
    for hook in hooks:
        hook.remove()
    return {
        "maps": [m.detach() for m in maps],
        "bn": outputs,
        "folded": folded,
        "grad_images": images.grad,
        "grads": {n: p.grad.clone() for n, p in encoder.named_parameters()},
        "stats": {n: b.clone() for n, b in encoder.named_buffers() if "running" in n},
    }


def encoder_worker(rank: int, out: str) -> None:
    images, active, probes = encoder_data()
    mine = slice(rank, rank + 1)
    for kind in ENCODERS:
        encoder = convert_sync_batchnorm(make_encoder(kind))
        ddp = DistributedDataParallel(encoder)
        result = encoder_step(ddp, encoder, images[mine], active[mine], [p[mine] for p in probes])
        torch.save(result, Path(out) / f"{kind}{rank}.pt")


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a - b).abs().max()) <= 1e-10 * max(float(b.abs().max()), 1e-30)


@pytest.mark.parametrize("kind", ENCODERS)
def test_sparse_encoder_bns_synchronise_under_ddp(two_processes: Path, kind: str) -> None:
    """Rank r holds image r (5 and 2 visible cells): the maps, every sparse BN output, the input
    gradients, the (DDP-averaged) parameter gradients and the running statistics equal those of
    one process that holds both images."""
    ranks = [torch.load(two_processes / f"{kind}{r}.pt") for r in (0, 1)]
    single = make_encoder(kind)
    want = encoder_step(single, single, *encoder_data())

    assert len(want["stats"]) == 2 * 12
    assert len(want["bn"]) + len(want["folded"]) == (12 if kind == "hand-written" else 0)
    for name, rows in want["bn"].items():  # block-major rows: image 0's sites, then image 1's
        assert len(ranks[0]["bn"][name]) != len(ranks[1]["bn"][name])
        assert close(torch.cat([r["bn"][name] for r in ranks]), rows), f"BN output {name}"
    for name, terms in want["folded"].items():  # the global statistics, on each rank
        for r in ranks:
            assert close(r["folded"][name], terms), f"folded BN {name}"
    for i, m in enumerate(want["maps"]):
        assert close(torch.cat([r["maps"][i] for r in ranks]), m), f"map {i}"
    assert close(torch.cat([r["grad_images"] for r in ranks]), want["grad_images"])
    for r in ranks:
        assert r["grads"].keys() == want["grads"].keys()
        for name, grad in want["grads"].items():  # the loss is the sum of the ranks'; DDP averages
            assert close(r["grads"][name], grad / 2), f"grad {name}"
        for name, stat in want["stats"].items():
            assert close(r["stats"][name], stat), f"running stat {name}"
    # and local statistics would differ: image 0 alone
    local = make_encoder(kind)
    images, active, probes = encoder_data()
    alone = encoder_step(local, local, images[:1], active[:1], [p[:1] for p in probes])
    assert not close(alone["maps"][0], ranks[0]["maps"][0])


def test_conversion_keeps_the_parameter_objects() -> None:
    """Pretraining builds its optimiser before converting: the converted dense BNs must hold the very
    Parameters (and buffers) it was given, or their weights would never be updated under CPU DDP."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    before = [id(t) for t in (*model.parameters(), *model.buffers())]
    convert_sync_batchnorm(model)
    assert isinstance(model[1], SyncBatchNorm2dRows)
    assert [id(t) for t in (*model.parameters(), *model.buffers())] == before
