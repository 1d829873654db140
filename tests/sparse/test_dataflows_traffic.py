"""The dataflows move no data they need not: no weight re-layout, no second copy of a canvas.

Counted with torch.profiler, which unlike a timing does not depend on the machine's load: a sparse
conv's forward + backward under each dataflow makes no `aten::copy_` at all, except those aten
makes inside its own convolution backward (oneDNN's internal weight reorder, out of our reach).
What used to be there: the NCHW weight copied to channels-last by the conv's forward and again by
its backward, the channels-last weight gradient copied back by AccumulateGrad, `gemm`'s weight
matrix built by a copy, and the `dense` canvas copied by an out-of-place `index_copy`.
"""

from __future__ import annotations

import MinkowskiEngine as ME
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from spark_me.sparse.layers import SparseConv2d
from spark_me.sparse.tensor import sparsify
from spark_me.sparse.tuner import DataflowTuner


def copies_outside_aten_conv_backward(fn) -> list[str]:
    """The parent chains of the `aten::copy_` calls `fn` makes, less those of aten's conv backward."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    found = []
    for event in prof.events():
        if event.name != "aten::copy_":
            continue
        chain, parent = [], event.cpu_parent
        while parent is not None:
            chain.append(parent.name)
            parent = parent.cpu_parent
        if "aten::convolution_backward" not in chain:
            found.append(" < ".join(chain[:4]))
    return found


@pytest.mark.parametrize("dataflow", ["block", "dense", "gemm"])
@pytest.mark.parametrize("stride", [1, 2])
def test_a_conv_forward_backward_makes_no_copy(dataflow: str, stride: int, gen) -> None:
    layer = SparseConv2d(16, 24, 3, stride, bias=True)
    layer.tuner = DataflowTuner(dataflow)
    active = torch.rand(2, 3, 2, generator=gen) < 0.6
    active[:, 0, 0] = True
    x = sparsify(torch.randn(2, 16, 24, 16, generator=gen), active, stride=4)  # blocks of 8 sites
    x = ME.SparseTensor(
        x.F.detach().requires_grad_(True),
        coordinate_map_key=x.coordinate_map_key,
        coordinate_manager=x.coordinate_manager,
    )
    layer(x)  # index tables are built on first use

    def forward_backward() -> None:
        out = layer(x).F
        out.backward(torch.ones_like(out))

    assert copies_outside_aten_conv_backward(forward_backward) == []
    assert layer.last_dataflow == dataflow
    assert layer.weight.is_contiguous(memory_format=torch.channels_last)
    assert layer.weight.grad.stride() == layer.weight.stride()
