"""A 1x1 conv and the identity shortcut of its input as one node: the same values and gradients as
apart (float64, 1e-12), and the input's two gradients summed by the GEMM, not by an `add_`."""

from __future__ import annotations

import MinkowskiEngine as ME
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from spark_me.sparse.layers import SparseConv2d
from spark_me.sparse.tensor import sparsify


def leaf_input(gen: torch.Generator, dtype: torch.dtype, channels: int = 12) -> ME.SparseTensor:
    active = torch.rand(2, 3, 2, generator=gen) < 0.6
    active[:, 0, 0] = True
    x = sparsify(torch.randn(2, channels, 24, 16, generator=gen, dtype=dtype), active, stride=4)
    return ME.SparseTensor(
        x.F.detach().requires_grad_(True),
        coordinate_map_key=x.coordinate_map_key,
        coordinate_manager=x.coordinate_manager,
    )


def block_like(conv: SparseConv2d, x: ME.SparseTensor, fused: bool):
    """A residual block's use of both outputs, each once: loss = <relu(h) * p1 + shortcut, p2>."""
    h, shortcut = conv.forward_and_identity(x) if fused else (conv(x), x)
    probe = torch.Generator().manual_seed(3)
    p1, p2 = (torch.randn(h.F.shape, generator=probe, dtype=h.F.dtype) for _ in range(2))
    return ((h.F.relu() * p1 + shortcut.F) * p2).sum(), h.F


def test_values_and_gradients_equal_the_separate_ops_float64(gen) -> None:
    conv = SparseConv2d(12, 12, 1).double()
    grads = []
    for fused in (False, True):
        x = leaf_input(torch.Generator().manual_seed(0), torch.float64)
        conv.zero_grad()
        loss, h = block_like(conv, x, fused)
        loss.backward()
        grads.append((h.detach(), x.F.grad, conv.weight.grad.clone()))
    for got, ref in zip(grads[1], grads[0], strict=True):
        assert float((got - ref).abs().max() / ref.abs().max()) <= 1e-12
    assert conv.last_dataflow == "pointwise"


def test_the_input_gradient_is_summed_without_add_(gen) -> None:
    conv = SparseConv2d(12, 12, 1)
    x = leaf_input(gen, torch.float32)
    loss, _ = block_like(conv, x, fused=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss.backward()
    names = [e.name for e in prof.events()]
    assert "aten::addmm" in names
    assert "aten::add_" not in names


@pytest.mark.parametrize(
    "conv", [SparseConv2d(12, 12, 3), SparseConv2d(12, 12, 1, bias=True)], ids=["3x3", "bias"]
)
def test_other_convs_return_the_input_itself(conv, gen) -> None:
    x = leaf_input(gen, torch.float32)
    h, shortcut = conv.forward_and_identity(x)
    assert shortcut is x
    assert torch.equal(h.F, conv(x).F)


def test_under_autocast_the_gemm_runs_in_bf16_and_tracks_float32(gen) -> None:
    conv = SparseConv2d(12, 12, 1)
    x = leaf_input(gen, torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h, shortcut = conv.forward_and_identity(x)
    assert h.F.dtype == shortcut.F.dtype == torch.bfloat16
    ref = (x.F.float() @ conv.weight.view(12, 12).t()).detach()
    assert float((h.F.detach().float() - ref).norm() / ref.norm()) < 2**-7
    (h.F.float().sum() + shortcut.F.float().sum()).backward()
    assert x.F.grad.dtype == torch.bfloat16 and conv.weight.grad.dtype == torch.float32
