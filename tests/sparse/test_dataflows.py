"""Every dataflow == an independent reference: forward, grad-input, grad-weight, fp64.

The reference is MinkowskiEngine's own function for convs and max-pools (checked against the
dense one below); for depthwise convs (whose ``me`` dataflow is this project's code over ME's
kernel map, checked too), grouped convs and average pools (which ME lacks) it is `F.conv2d` /
`F.avg_pool2d` on the zero-filled dense map. Ops as the encoders use them, at the
block sizes they meet (b = 32 / stride: 8 at stride 4 down to 1 at stride 32), on odd non-square
grids, mask ratios 0 / 0.6 / 0.9, a batch of one, an image with a single visible cell, and an
image with none between images with some.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spark_me.sparse.dataflows import candidates
from spark_me.sparse.layers import SparseConv2d, SparseDepthwiseConv2d, SparseMaxPool2d, _TunedOp
from spark_me.sparse.me_dataflow import supports as me_supports
from spark_me.sparse.ops import SparseOp
from spark_me.sparse.tensor import densify, sparsify, upsample_mask
from spark_me.sparse.tuner import DataflowTuner

CELL = 32


def make_mask(gen: torch.Generator, batch: int, grid: tuple[int, int], case: str) -> torch.Tensor:
    h, w = grid
    if case == "single":  # one visible cell per image, one of them in a corner
        active = torch.zeros(batch, h, w, dtype=torch.bool)
        active[0, h - 1, w - 1] = True
        for i in range(1, batch):
            active[
                i, int(torch.randint(h, (1,), generator=gen)), int(torch.randint(w, (1,), generator=gen))
            ] = True
        return active
    if case == "empty":  # image 1 fully masked, between images with visible cells
        active = torch.rand(batch, h, w, generator=gen) < 0.5
        active[:, 0, 0] = True
        active[1] = False
        return active
    ratio = float(case)
    active = torch.rand(batch, h, w, generator=gen) >= ratio
    active.view(batch, -1)[:, 0] |= ~active.view(batch, -1).any(1)  # >= 1 visible cell per image
    return active


def run(layer, dataflow: str, x: torch.Tensor, active: torch.Tensor, stride: int, probe_seed: int = 7):
    """Dense view of the output and the gradients of input and parameters under `dataflow`."""
    layer.tuner = DataflowTuner(dataflow)
    layer.zero_grad()
    xi = x.clone().requires_grad_(True)
    out = layer(sparsify(xi, active, stride=stride))
    out_stride = out.tensor_stride[0]
    b, _, h, w = x.shape
    shape = (b, out.F.shape[1], h * stride // out_stride, w * stride // out_stride)
    y = densify(out, shape)
    probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(probe_seed), dtype=y.dtype)
    (y * probe).sum().backward()
    return y.detach(), xi.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}, layer.last_dataflow


def dense_reference(layer, x: torch.Tensor, active: torch.Tensor, probe_seed: int = 7):
    """What `run` returns, computed densely without the engine: conv (any groups) on the zero-filled
    map or max-pool on the -inf-filled map (MinkowskiEngine's placement: odd kernels centred, even
    ones spanning offsets 0..k-1), read at the visible output sites."""
    op = layer.op
    k, s = op.kernel_size, op.stride
    lo = k // 2 if k % 2 else 0
    pad = (lo, k - 1 - lo, lo, k - 1 - lo)
    layer.zero_grad()
    xi = x.clone().requires_grad_(True)
    visible = upsample_mask(active, *x.shape[2:])
    if op.kind == "maxpool":
        filled = F.pad(xi.masked_fill(~visible, float("-inf")), pad, value=float("-inf"))
        y = F.max_pool2d(filled, k, s)
    elif op.kind == "avgpool":  # aligned windows: even kernels equal the stride, no padding
        y = F.avg_pool2d(xi * visible, k, s, lo, count_include_pad=op.count_include_pad)
    else:
        y = F.conv2d(F.pad(xi * visible, pad), layer.weight, layer.bias, s, groups=op.groups)
    y = torch.where(upsample_mask(active, *y.shape[2:]), y, torch.zeros_like(y))
    probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(probe_seed), dtype=y.dtype)
    (y * probe).sum().backward()
    return y.detach(), xi.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}, "dense reference"


def assert_close(a: torch.Tensor, b: torch.Tensor, tol: float, what: str) -> None:
    scale = b.abs().max().clamp_min(1e-30)
    err = float((a - b).abs().max() / scale)
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


class OpLayer(_TunedOp):
    """Any `SparseOp` as a layer: the ops the generic path creates without a layer class of their
    own (grouped and strided depthwise convs, average pools)."""

    def __init__(self, op: SparseOp):
        super().__init__()
        self.op = op
        self.weight = self.bias = None
        if op.weighted:
            k = op.kernel_size
            fan_in = op.in_channels // op.groups * k * k
            shape = (op.out_channels, op.in_channels // op.groups, k, k)
            self.weight = nn.Parameter(torch.randn(shape) / math.sqrt(fan_in))
            self.bias = nn.Parameter(torch.randn(op.out_channels))

    def forward(self, x):
        return self.run_op(x, self.weight, self.bias)


LAYERS = {
    "conv3x3/1": lambda c: SparseConv2d(c, 5, 3, 1, bias=True),
    "conv3x3/2": lambda c: SparseConv2d(c, 5, 3, 2),
    "conv7x7/2": lambda c: SparseConv2d(c, 4, 7, 2),
    "conv1x1/2": lambda c: SparseConv2d(c, 5, 1, 2),
    "conv2x2/2": lambda c: SparseConv2d(c, 5, 2, 2, bias=True),
    "conv4x4/4": lambda c: SparseConv2d(c, 5, 4, 4, bias=True),
    "dw7x7": lambda c: SparseDepthwiseConv2d(c, 7),
    "dw3x3": lambda c: SparseDepthwiseConv2d(c, 3),
    "maxpool3x3/2": lambda c: SparseMaxPool2d(3, 2, channels=c),
    "conv3x3/2 g=c": lambda c: OpLayer(SparseOp("conv", 3, 2, c, 2 * c, groups=c)),
    "dw3x3/2": lambda c: OpLayer(SparseOp("depthwise", 3, 2, c, c)),
    "avgpool3x3/2": lambda c: OpLayer(SparseOp("avgpool", 3, 2, c, c)),
    "avgpool3x3/1 excl-pad": lambda c: OpLayer(SparseOp("avgpool", 3, 1, c, c, count_include_pad=False)),
    "avgpool2x2/2": lambda c: OpLayer(SparseOp("avgpool", 2, 2, c, c)),
}


# (layer, input stride) pairs whose output stride still divides the cell, as in the encoders
CONFIGS = [
    (name, stride)
    for name, factory in LAYERS.items()
    for stride in (1, 2, 4, 8, 16, 32)
    if CELL % (stride * factory(1).op.stride) == 0
]


@pytest.mark.parametrize(("layer_name", "stride"), CONFIGS)
@pytest.mark.parametrize("case", ["0", "0.6", "0.9", "single", "empty"])
def test_dataflows_equal_a_reference(layer_name: str, stride: int, case: str, gen: torch.Generator) -> None:
    layer = LAYERS[layer_name](3).double()
    grid, batch = (3, 5), {"0.9": 1, "empty": 3}.get(case, 2)
    b = CELL // stride
    active = make_mask(gen, batch, grid, case)
    x = torch.randn(batch, 3, grid[0] * b, grid[1] * b, generator=gen, dtype=torch.float64)
    op = layer.op
    if op.kind == "depthwise" or not me_supports(op):
        ref, names = (
            dense_reference(layer, x, active),
            [*candidates(op), *(["me"] if me_supports(op) else [])],
        )
    else:
        ref, names = run(layer, "me", x, active, stride), candidates(layer.op)
        assert ref[3] == "me"
        dense = dense_reference(layer, x, active)  # the two references agree
        for i, what in ((0, "forward"), (1, "grad input")):
            assert_close(dense[i], ref[i], 1e-10, f"dense reference {what}")
        for p in ref[2]:
            assert_close(dense[2][p], ref[2][p], 1e-10, f"dense reference grad {p}")
    for name in names:
        got = run(layer, name, x, active, stride)
        assert got[3] == name
        assert_close(got[0], ref[0], 1e-10, f"{name} forward")
        assert_close(got[1], ref[1], 1e-10, f"{name} grad input")
        for p in ref[2]:
            assert_close(got[2][p], ref[2][p], 1e-10, f"{name} grad {p}")


@pytest.mark.parametrize("layer_name", sorted(LAYERS))
def test_an_all_masked_batch_is_refused_alike_by_every_dataflow(layer_name: str, gen) -> None:
    """No site at all: every dataflow refuses with the same one-line error (ME's own functions
    crash on an empty map, so computing an empty output is not an option for ``me``)."""
    layer = LAYERS[layer_name](3).double()
    x = torch.randn(2, 3, 64, 96, generator=gen, dtype=torch.float64)
    empty = sparsify(x, torch.zeros(2, 2, 3, dtype=torch.bool))
    assert empty.F.shape == (0, 3)
    for name in ["me", *candidates(layer.op), "auto", "rules"]:
        layer.tuner = DataflowTuner(name)
        with pytest.raises(
            ValueError, match=r"^no visible site in the batch \(every image is fully masked\)"
        ):
            layer(empty)


STRIDED_1X1_CHILD = """
import torch
import torch.nn.functional as F
from spark_me.sparse.tensor import densify, sparsify, upsample_mask
from spark_me.sparse.tuner import DataflowTuner
from tests.sparse.test_dataflows import LAYERS, assert_close, candidates, make_mask
assert torch.get_num_threads() == 2, torch.get_num_threads()
gen = torch.Generator().manual_seed(0)
for channels in (8, 12):
    for dtype in (torch.float32, torch.bfloat16):
        layer = LAYERS["conv1x1/2"](channels).to(dtype)
        active = make_mask(gen, 2, (3, 5), "0.6")
        x = torch.randn(2, channels, 3 * 16, 5 * 16, generator=gen).to(dtype)
        probe = torch.randn(2, 5, 24, 40, generator=gen).to(dtype)
        xr = x.double().requires_grad_(True)  # the reference: float64 dense conv, visible sites
        wr = layer.weight.detach().double().requires_grad_(True)
        y = F.conv2d(xr * upsample_mask(active, 48, 80), wr, stride=2)
        y = y * upsample_mask(active, 24, 40)
        (y * probe.double()).sum().backward()
        for name in candidates(layer.op):
            layer.tuner = DataflowTuner(name)
            layer.zero_grad()
            xi = x.clone().requires_grad_(True)
            out = densify(layer(sparsify(xi, active, stride=2)), (2, 5, 24, 40))
            (out * probe).sum().backward()
            what = f"{name} {dtype} c={channels}"
            assert_close(out.detach().double(), y.detach(), 2e-2, what + " forward")
            assert_close(xi.grad.double(), xr.grad, 2e-2, what + " grad-input")
            assert_close(layer.weight.grad.double(), wr.grad, 2e-2, what + " grad-weight")
print("ok")
"""


def test_strided_1x1_backward_with_two_threads() -> None:
    """torch 2.14's CPU convolution_backward of a 1x1 stride-2 conv on a channels-last input with 2
    threads corrupts the heap for 8 or 12 input channels on 16-site blocks (the README's findings);
    the dataflows compute that backward as GEMMs instead. The suite's workers run one thread each
    (conftest), so this case runs in a child that starts with 2 threads (a thread count set after
    start-up does not reach oneDNN's pool), in float32 and bf16, against the float64 dense conv."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    child = subprocess.run(
        [sys.executable, "-c", STRIDED_1X1_CHILD], cwd=root, env=env, capture_output=True, text=True
    )
    assert child.returncode == 0 and child.stdout.strip() == "ok", child.stderr[-2000:]
