"""Whatever dataflow runs the sparse ops, the encoders equal the masked-dense reference.

float64, forward maps and every parameter's gradient, odd non-square images, high mask ratio and
a single visible cell; each dataflow forced everywhere, and the autotuner's mix.
"""

from __future__ import annotations

import pytest
import torch

from spark_me.sparse.dataflows import candidates

from ..sparse.test_dataflows_bf16 import KernelDtypes
from .conftest import TINY, mask_for
from .test_encoders import assert_maps_equal

DATAFLOWS = ["block", "dense", "gemm", "me", "auto"]


def forward_backward(model, images, active):
    model.zero_grad()
    maps = model(images, active)
    probe = torch.Generator().manual_seed(5)
    sum(
        (m * torch.randn(m.shape, generator=probe, dtype=m.dtype).to(m.device)).sum() for m in maps
    ).backward()
    return maps, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", ["0.75", "single"])
@pytest.mark.parametrize("dataflow", DATAFLOWS)
@pytest.mark.parametrize("arch", ["resnet50", "convnext_atto", "convnextv2_tiny"])
def test_encoder_equals_reference_under_every_dataflow(
    pair_factory, gen, arch, dataflow, case, device
) -> None:
    sparse, reference = pair_factory(arch)
    sparse.set_dataflow(dataflow)
    sparse.double().train().to(device)
    reference.double().train().to(device)
    images = torch.randn(2, 3, 64, 160, generator=gen, dtype=torch.float64)
    if case == "single":
        active = torch.zeros(2, 2, 5, dtype=torch.bool)
        active[0, 1, 4] = active[1, 0, 1] = True
    else:
        active = mask_for(images, float(case), gen)
    images, active = images.to(device), active.to(device)
    got, got_grads = forward_backward(sparse, images, active)
    ref, ref_grads = forward_backward(reference, images, active)
    assert_maps_equal(got, ref, sparse.channels, images, rtol=1e-10)
    ref_grads = {n.removeprefix("model."): g for n, g in ref_grads.items()}
    assert set(got_grads) <= set(ref_grads)
    for name, g in got_grads.items():
        scale = ref_grads[name].abs().max().clamp_min(1e-12)
        assert float((g - ref_grads[name]).abs().max() / scale) <= 1e-9, name
    for name, _, flow in sparse.dataflow_table():  # forced means used wherever it applies
        op = sparse.get_submodule(name).op
        if op.kernel_size * op.stride > 1 and (dataflow == "me" or dataflow in candidates(op)):
            assert flow == dataflow, name


@pytest.mark.parametrize("dataflow", ["rules", "block", "dense", "gemm"])
@pytest.mark.parametrize("arch", sorted(TINY))
def test_bf16_autocast_tracks_float32(pair_factory, gen, arch, dataflow) -> None:
    """Under bf16 autocast every conv / GEMM / pool kernel of the encoder runs in bf16, forward and
    backward, whatever the dataflow; the maps stay within 5 % (relative norm) of float32 after the
    dozens of layers (each op alone: tests/sparse/test_dataflows_bf16.py, within 2^-7)."""
    sparse, _ = pair_factory(arch)
    sparse.set_dataflow(dataflow)
    images = torch.randn(2, 3, 96, 128, generator=gen)
    active = mask_for(images, 0.6, gen)
    full = sparse(images, active)
    with torch.autocast("cpu", dtype=torch.bfloat16), KernelDtypes() as forward:
        half = sparse(images, active)
    with KernelDtypes() as backward:
        sum(h.float().sum() for h in half).backward()
    for phase, calls in (("forward", forward.calls), ("backward", backward.calls)):
        assert calls and all(dtypes == {torch.bfloat16} for _, dtypes in calls), (phase, calls)
    for h, f in zip(half, full, strict=True):
        assert torch.isfinite(h).all()
        assert float((h.float() - f).norm() / f.norm()) <= 0.05
