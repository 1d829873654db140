"""A BN -> ReLU folded into the next op (bn_relu.py) == the op after F.batch_norm and F.relu, in
float64, forward and backward (input, the op's weight, the BN's weight and bias, running
statistics), under every dataflow; and the folded ops save the BN's input alone."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from spark_me.sparse.dataflows import FOLDS_PROLOGUE, candidates
from spark_me.sparse.layers import (
    SparseBatchNorm2d,
    SparseConv2d,
    SparseDepthwiseConv2d,
    SparseMaxPool2d,
    with_features,
)
from spark_me.sparse.tensor import densify, sparsify
from spark_me.sparse.tuner import DataflowTuner

from .test_dataflows import CELL, make_mask

CHANNELS = 5
OPS = {
    "conv3x3/1": lambda: SparseConv2d(CHANNELS, 6, 3),
    "conv3x3/2": lambda: SparseConv2d(CHANNELS, 6, 3, 2),
    "conv1x1/1": lambda: SparseConv2d(CHANNELS, 6, 1),  # pointwise: a GEMM on the rows
    "conv1x1/2": lambda: SparseConv2d(CHANNELS, 6, 1, 2),
    "maxpool3x3/2": lambda: SparseMaxPool2d(3, 2, channels=CHANNELS),
    "depthwise3x3": lambda: SparseDepthwiseConv2d(CHANNELS, 3),  # fused / me: made as a tensor
}


def dataflows_of(layer) -> list[str]:
    if isinstance(layer, SparseConv2d) and layer.kernel_size == 1 and layer.stride == 1:
        return ["pointwise"]
    return [*candidates(layer.op), "me"]


CASES = [(op, flow) for op, make in OPS.items() for flow in dataflows_of(make())]


def bn_of(gen: torch.Generator) -> SparseBatchNorm2d:
    bn = SparseBatchNorm2d(CHANNELS).double()
    with torch.no_grad():  # weights of both signs; running statistics away from 0 / 1
        bn.weight.copy_(torch.randn(CHANNELS, generator=gen, dtype=torch.float64))
        bn.bias.copy_(torch.randn(CHANNELS, generator=gen, dtype=torch.float64))
        bn.running_mean.copy_(torch.randn(CHANNELS, generator=gen, dtype=torch.float64))
        bn.running_var.copy_(torch.rand(CHANNELS, generator=gen, dtype=torch.float64) + 0.5)
    return bn


def step(layer, bn, images: torch.Tensor, active: torch.Tensor, stride: int, fold: bool):
    """(output map, grad of the images, grads of the layer's and the BN's parameters, running stats)."""
    layer.zero_grad()
    bn.zero_grad()
    xi = images.clone().requires_grad_(True)
    x = sparsify(xi, active, stride=stride)
    if fold:
        out = layer(x, bn.relu_prologue(x))
    else:  # the reference: aten's batch norm and ReLU on the rows, then the op on their output
        rows = F.batch_norm(
            x.F, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.training, bn.momentum, bn.eps
        )
        out = layer(with_features(x, F.relu(rows)))
    scale = out.tensor_stride[0] // stride
    b, _, h, w = images.shape
    y = densify(out, (b, out.F.shape[1], h // scale, w // scale))
    probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=y.dtype)
    (y * probe).sum().backward()
    grads = {n: p.grad.clone() for n, p in [*layer.named_parameters(), *bn.named_parameters("bn")]}
    return y.detach(), xi.grad, grads, (bn.running_mean.clone(), bn.running_var.clone())


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a - b).abs().max()) <= 1e-10 * max(float(b.abs().max()), 1.0)


@pytest.mark.parametrize("case", ["0.6", "single"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("stride", [4, 16])
@pytest.mark.parametrize(("op", "dataflow"), CASES)
def test_folded_equals_batch_norm_then_relu(
    op: str, dataflow: str, stride: int, train: bool, case: str, gen
) -> None:
    layer = OPS[op]().double()
    if dataflow != "pointwise":
        layer.tuner = DataflowTuner(dataflow)
    bn = bn_of(gen).train(train)
    active = make_mask(gen, 3, (2, 3), case)
    side = CELL // stride
    images = torch.randn(3, CHANNELS, 2 * side, 3 * side, generator=gen, dtype=torch.float64)
    got = step(layer, copy.deepcopy(bn), images, active, stride, fold=True)
    if dataflow != "pointwise":
        assert layer.last_dataflow == dataflow
    want = step(layer, copy.deepcopy(bn), images, active, stride, fold=False)
    assert close(got[0], want[0]), "output"
    assert close(got[1], want[1]), "grad input"
    assert got[2].keys() == want[2].keys()
    for name, g in want[2].items():
        assert g.abs().max() > 0, f"{name}: no gradient in the reference"
        assert close(got[2][name], g), f"grad {name}"
    for a, b in zip(got[3], want[3], strict=True):
        assert close(a, b), "running statistics"
    if not train:
        assert torch.equal(got[3][0], bn.running_mean)


FOLDING = [(op, flow) for op, flow in CASES if flow in FOLDS_PROLOGUE | {"pointwise"}]


@pytest.mark.parametrize(("op", "dataflow"), FOLDING)
def test_folded_ops_save_the_batch_norm_input_alone(op: str, dataflow: str, gen) -> None:
    """Of the [N, C] tensors autograd keeps, the folded op and BN keep one: the BN's input. Layer
    by layer the ReLU's output is kept too."""
    layer = OPS[op]().double()
    if dataflow != "pointwise":
        layer.tuner = DataflowTuner(dataflow)
    bn = bn_of(gen)
    side = CELL // 4
    images = torch.randn(2, CHANNELS, 2 * side, 3 * side, generator=gen, dtype=torch.float64)
    x = sparsify(images.requires_grad_(True), make_mask(gen, 2, (2, 3), "0.6"), stride=4)
    for fold, kept in ((True, 1), (False, 2)):
        rows = {}

        def pack(t, rows=rows):
            if t.shape == x.F.shape and t.is_floating_point():
                rows[t.untyped_storage().data_ptr()] = t
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if fold:
                layer(x, bn.relu_prologue(x))
            else:
                layer(with_features(x, F.relu(bn(x).F)))
        assert len(rows) == kept, (fold, [t.grad_fn for t in rows.values()])
        if fold:
            assert x.F.untyped_storage().data_ptr() in rows
