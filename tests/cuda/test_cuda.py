"""What only a GPU can check: ME's CUDA kernels and every dataflow on CUDA against the CPU, SparK
training steps under bf16 autocast, and a checkpoint written on the GPU read back.

Marked `cuda`: deselected by default (pytest addopts `-m "not cuda"`), run by
`python3 -m spark_me.bootstrap gpu-check` (`pytest -m cuda`). Selected on a machine without a GPU
they fail, they do not skip. The encoders-vs-masked-dense checks on CUDA are the `device=cuda`
variants of tests/models (same marker).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import spark_me
from spark_me.engine import checkpoint
from spark_me.sparse.dataflows import candidates
from spark_me.sparse.tensor import densify, sparsify
from spark_me.sparse.tuner import DataflowTuner

from ..models.test_spark import small_spark
from ..sparse.test_dataflows import CELL, CONFIGS, LAYERS, assert_close, make_mask

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True, scope="module")
def _gpu() -> None:
    import MinkowskiEngine as ME

    assert torch.cuda.is_available(), "pytest -m cuda needs a GPU that torch can see"
    assert ME.is_cuda_available(), "MinkowskiEngine was built without CUDA (SPARK_ME_CUDA=1 to rebuild)"


def run_on(device: str, layer, dataflow: str, x, active, stride: int):
    """Dense output and input/parameter gradients of `layer` under `dataflow` on `device` (as CPU tensors)."""
    layer = layer.to(device)
    layer.tuner = DataflowTuner(dataflow)
    layer.zero_grad()
    xi = x.to(device).clone().requires_grad_(True)
    out = layer(sparsify(xi, active.to(device), stride=stride))
    b, _, h, w = x.shape
    ratio = stride / out.tensor_stride[0]
    y = densify(out, (b, out.F.shape[1], int(h * ratio), int(w * ratio)))
    probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=y.dtype).to(device)
    (y * probe).sum().backward()
    grads = {n: p.grad.cpu() for n, p in layer.named_parameters()}
    return y.detach().cpu(), xi.grad.cpu(), grads, layer.last_dataflow


@pytest.mark.parametrize(("layer_name", "stride"), CONFIGS)
@pytest.mark.parametrize("case", ["0", "0.6", "single"])
def test_every_dataflow_on_cuda_equals_me_on_the_cpu(layer_name, stride, case, gen) -> None:
    layer = LAYERS[layer_name](3).double()
    batch, b = 2, CELL // stride
    active = make_mask(gen, batch, (3, 5), case)
    x = torch.randn(batch, 3, 3 * b, 5 * b, generator=gen, dtype=torch.float64)
    ref = run_on("cpu", layer, "me", x, active, stride)
    for name in ["me", *candidates(layer.op)]:
        got = run_on("cuda", layer, name, x, active, stride)
        assert got[3] == name
        assert_close(got[0], ref[0], 1e-9, f"{name} forward on CUDA")
        assert_close(got[1], ref[1], 1e-9, f"{name} grad input on CUDA")
        for p in ref[2]:
            assert_close(got[2][p], ref[2][p], 1e-9, f"{name} grad {p} on CUDA")


@pytest.mark.parametrize("arch", ["resnet50", "convnextv2_atto"])
def test_spark_learns_under_bf16_autocast_on_cuda(arch: str, gen) -> None:
    """A few optimiser steps on one batch: finite bf16 losses that go down, fp32 master weights."""
    model = small_spark(arch).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = torch.randn(4, 3, 64, 96, generator=gen).cuda()
    active = spark_me.random_mask(4, 64, 96, 0.6, generator=gen).cuda()
    losses = []
    for _ in range(8):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(images, active)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_checkpoint_written_on_cuda_reads_back_exactly(tmp_path: Path, gen) -> None:
    model = small_spark("resnet18").cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = torch.randn(2, 3, 64, 64, generator=gen).cuda()
    active = spark_me.random_mask(2, 64, 64, 0.5, generator=gen).cuda()
    model(images, active).backward()
    optimizer.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 0, "step": 1,
             "config": {"arch": "resnet18", "model_kwargs": {}}}  # fmt: skip
    path = checkpoint.save(tmp_path, state, epoch=0, numbered=False, keep_last=0)
    loaded = checkpoint.load(path)
    again = small_spark("resnet18").cuda()
    again.load_state_dict(loaded["model"])
    model.eval()
    again.eval()
    with torch.no_grad():
        assert torch.equal(model(images, active), again(images, active))
    restored = torch.optim.AdamW(again.parameters(), lr=1e-3)
    restored.load_state_dict(loaded["optimizer"])
    first = next(iter(optimizer.state.values()))["exp_avg"]
    assert torch.equal(next(iter(restored.state.values()))["exp_avg"].cuda(), first)
