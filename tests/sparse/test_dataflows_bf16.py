"""Every plain-torch dataflow under bf16 autocast: it really computes in bf16, and it is as accurate
as bf16 allows (forward and every gradient against the same dataflow in float64).

The tolerance comes from bf16's precision: 8 significant bits, unit roundoff u = 2^-8 = 3.9e-3.
Inputs, weights and outputs are each rounded once (the conv and GEMM kernels accumulate in
float32); torch's own bf16 average-pool backward also sums overlapping windows in bf16 (about 2u
on a dense map alone). Measured here, relative to the largest value of each tensor: forward
0-1.26u, gradients 0.43u-2.02u (the average pools' input gradients); the bound is 2.5u = 9.8e-3.
A kernel that ran in float32 would be *more* accurate, which no tolerance can catch: a dispatch
record of the dtypes reaching the convolution / GEMM / pooling kernels, forward and backward, does.
The C++ depthwise kernels (depthwise.py; ``fused``, and the block / dense weight gradient) are no
aten ops: the record takes the dtypes of the tensors handed to them instead.
"""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from spark_me.sparse import depthwise
from spark_me.sparse.dataflows import candidates
from spark_me.sparse.tensor import densify, sparsify
from spark_me.sparse.tuner import DataflowTuner

from .test_dataflows import CELL, LAYERS

U = 2.0**-8  # bf16 unit roundoff
TOL = 2.5 * U  # 9.8e-3
# the aten kernels that do a dataflow's arithmetic (everything else only moves rows)
KERNELS = {
    "convolution",
    "convolution_backward",
    "mm",
    "addmm",
    "bmm",
    "max_pool2d_with_indices",
    "max_pool2d_with_indices_backward",
    "index_add_",  # the max-pool's backward (dataflows._MaxPool)
    "avg_pool2d",
    "avg_pool2d_backward",
}


class KernelDtypes(TorchDispatchMode):
    """Records (kernel, dtypes of its floating-point tensor arguments) for every kernel in KERNELS
    and every C++ depthwise kernel."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, set[torch.dtype]]] = []
        self._native = mock.patch.object(depthwise, "_kernel", self._record_native(depthwise._kernel))

    def _record_native(self, kernel):
        def record(name: str, *tensors: torch.Tensor):
            self.calls.append((name, {t.dtype for t in tensors if t.is_floating_point()}))
            return kernel(name, *tensors)

        return record

    def __enter__(self):
        self._native.start()
        return super().__enter__()

    def __exit__(self, *exc):
        self._native.stop()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in KERNELS:
            leaves = tree_leaves((args, kwargs or {}))
            dtypes = {t.dtype for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()}
            self.calls.append((name, dtypes))
        return func(*args, **(kwargs or {}))


def forward_backward(layer, x: torch.Tensor, active: torch.Tensor, stride: int, bf16: bool):
    """(output, grad input, grads of parameters, kernels run forward, kernels run backward)."""
    layer.zero_grad()
    xi = x.clone().requires_grad_(True)
    # pools run in their input's dtype: bf16 when a bf16 conv / norm comes before, as in the encoders
    features = xi.to(torch.bfloat16) if bf16 and not layer.op.weighted else xi
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), KernelDtypes() as fwd:
        out = layer(sparsify(features, active, stride=stride))
    b, _, h, w = x.shape
    scale = out.tensor_stride[0] // stride
    y = densify(out, (b, out.F.shape[1], h // scale, w // scale))
    probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with KernelDtypes() as bwd:
        (y.double() * probe).sum().backward()
    grads = {}
    for name, p in layer.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        grads[name] = p.grad.double()
    return y.detach().double(), xi.grad.double(), grads, fwd.calls, bwd.calls


def distinct_bf16_values(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """float32 values exactly representable in bf16, all distinct (consecutive bf16 bit patterns from
    the smallest normal up, shuffled, random signs): max-pool then selects the same site in bf16
    as in float64, with no ties whose breaking could differ."""
    n = torch.Size(shape).numel()
    bits = torch.arange(0x0080, 0x0080 + n, dtype=torch.int16)[torch.randperm(n, generator=gen)]
    signs = torch.randint(0, 2, (n,), generator=gen) * 2 - 1
    return (bits.view(torch.bfloat16).float() * signs).view(shape)


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


CASES = [
    (name, stride)
    for name, factory in LAYERS.items()
    for stride in (2, 16)
    if CELL % (stride * factory(1).op.stride) == 0
]


@pytest.mark.parametrize(("layer_name", "stride"), CASES)
def test_bf16_is_bf16_and_as_accurate_as_bf16_allows(layer_name: str, stride: int, gen) -> None:
    layer = LAYERS[layer_name](8)
    active = torch.rand(2, 2, 3, generator=gen) < 0.6
    active[:, 0, 0] = True
    b = CELL // stride
    shape = (2, 8, 2 * b, 3 * b)
    x = distinct_bf16_values(shape, gen) if layer.op.kind == "maxpool" else torch.randn(shape, generator=gen)
    for name in candidates(layer.op):
        layer.tuner = DataflowTuner(name)
        got, got_gx, got_gp, fwd, bwd = forward_backward(layer, x, active, stride, bf16=True)
        assert layer.last_dataflow == name
        for phase, calls in (("forward", fwd), ("backward", bwd)):
            assert calls, f"{name}: no kernel recorded in the {phase}"
            assert all(dtypes == {torch.bfloat16} for _, dtypes in calls), f"{name} {phase}: {calls}"
        reference = copy.deepcopy(layer).double()
        ref, ref_gx, ref_gp, _, _ = forward_backward(reference, x.double(), active, stride, bf16=False)
        errors = {"forward": relative_error(got, ref), "grad input": relative_error(got_gx, ref_gx)}
        errors |= {f"grad {p}": relative_error(got_gp[p], ref_gp[p]) for p in ref_gp}
        assert max(errors.values()) <= TOL, f"{name}: {errors}"
        if layer.op.kind != "maxpool":  # max-pool selects an input, exact in bf16 here
            assert errors["forward"] > 0, f"{name}: bf16 output equals float64's exactly"
