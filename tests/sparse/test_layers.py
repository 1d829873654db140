"""Each sparse layer == its dense torch/timm twin on the zero-filled map, forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.layers.grn import GlobalResponseNorm
from torch import nn

from spark_me.sparse.layers import (
    SparseBatchNorm2d,
    SparseConv2d,
    SparseDepthwiseConv2d,
    SparseDropPath,
    SparseGRN,
    SparseLayerNorm,
    SparseLinear,
    SparseMaxPool2d,
    add,
)
from spark_me.sparse.tensor import densify, sparsify, upsample_mask
from spark_me.sparse.tuner import DataflowTuner

B, C, H, W = 3, 6, 16, 24


@pytest.fixture
def case(gen: torch.Generator):
    """Patch-aligned mask (4-px cells); image 1 fully visible, image 2 with at least one cell."""
    active = torch.rand(B, H // 4, W // 4, generator=gen) < 0.5
    active[1] = True
    active[2, 0, 0] = True
    x = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64)
    return x, active


def compare(layer: nn.Module, dense_fn, x: torch.Tensor, active: torch.Tensor, stride: int = 1, tol=1e-10):
    """Forward and input/parameter gradients of the sparse layer vs the dense function."""
    out_shape = None
    grads = []
    for path in ("sparse", "dense"):
        layer.zero_grad()
        xi = x.clone().requires_grad_(True)
        if path == "sparse":
            out = layer(sparsify(xi, active))
            out_shape = (B, out.F.shape[1], H // stride, W // stride)
            y = densify(out, out_shape)
        else:
            keep_in = upsample_mask(active, H, W)
            y = dense_fn(xi * keep_in) * upsample_mask(active, H // stride, W // stride)
        probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=y.dtype)
        (y * probe).sum().backward()
        grads.append((y.detach(), xi.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}))
    (ys, gxs, gps), (yd, gxd, gpd) = grads
    assert (ys - yd).abs().max() <= tol * yd.abs().max()
    assert (gxs - gxd).abs().max() <= tol * gxd.abs().max().clamp_min(1)
    for name in gps:
        assert (gps[name] - gpd[name]).abs().max() <= tol * gpd[name].abs().max().clamp_min(1), name


@pytest.mark.parametrize("dataflow", ["block", "dense", "gemm", "me"])
@pytest.mark.parametrize(("k", "stride"), [(1, 1), (1, 2), (2, 2), (3, 1), (3, 2), (4, 4), (7, 2)])
def test_conv(case, k: int, stride: int, dataflow: str) -> None:
    x, active = case
    conv = SparseConv2d(C, 5, k, stride, bias=True).double()
    conv.tuner = DataflowTuner(dataflow)
    pad = k // 2 if k % 2 else 0
    compare(conv, lambda t: F.conv2d(t, conv.weight, conv.bias, stride, pad), x, active, stride)
    assert conv.last_dataflow == ("pointwise" if k * stride == 1 else dataflow)  # what was asked ran


@pytest.mark.parametrize("dataflow", ["block", "dense", "me"])
@pytest.mark.parametrize("k", [3, 7])
def test_depthwise_conv(case, k: int, dataflow: str) -> None:
    x, active = case
    conv = SparseDepthwiseConv2d(C, k).double()
    conv.tuner = DataflowTuner(dataflow)
    compare(conv, lambda t: F.conv2d(t, conv.weight, conv.bias, padding=k // 2, groups=C), x, active)
    assert conv.last_dataflow == dataflow


@pytest.mark.parametrize("train", [True, False])
def test_batchnorm(case, gen, train: bool) -> None:
    """Statistics over active sites; also a regression test for torch's eval-mode BN backward on
    strided input, which is wrong on the CPU in torch 2.14 (the layer makes its input contiguous)."""
    x, active = case
    bn = SparseBatchNorm2d(C).double().train(train)
    with torch.no_grad():
        bn.running_mean.normal_(generator=gen)
        bn.running_var.uniform_(0.5, 1.5, generator=gen)
        bn.weight.uniform_(0.5, 1.5, generator=gen)
        bn.bias.normal_(generator=gen)
    dense_bn = nn.BatchNorm2d(C).double().train(train)
    dense_bn.load_state_dict(bn.state_dict())

    def masked_bn(t: torch.Tensor) -> torch.Tensor:
        keep = upsample_mask(active, H, W)[:, 0]
        vectors = t.permute(0, 2, 3, 1)[keep]
        if train:
            mean, var = vectors.mean(0), vectors.var(0, unbiased=False)
        else:
            mean, var = dense_bn.running_mean, dense_bn.running_var
        normed = (t - mean[:, None, None]) / (var[:, None, None] + dense_bn.eps).sqrt()
        return normed * dense_bn.weight[:, None, None] + dense_bn.bias[:, None, None]

    # parameter gradients of the closed-form dense version live on dense_bn: tie them to bn's
    dense_bn.weight, dense_bn.bias = bn.weight, bn.bias
    compare(bn, masked_bn, x, active)


def test_layernorm_and_linear(case) -> None:
    x, active = case
    norm = SparseLayerNorm(C, eps=1e-6).double()
    nn.init.normal_(norm.weight)
    compare(
        norm,
        lambda t: F.layer_norm(t.permute(0, 2, 3, 1), (C,), norm.weight, norm.bias, 1e-6).permute(0, 3, 1, 2),
        x,
        active,
    )
    lin = SparseLinear(C, 4, conv_shaped=True).double()
    compare(lin, lambda t: F.conv2d(t, lin.weight, lin.bias), x, active)


def test_grn_is_per_image(case, gen) -> None:
    """== timm's dense GRN on the zero-filled map, per image (not pooled over the batch)."""
    x, active = case
    grn = SparseGRN(C).double()
    with torch.no_grad():
        grn.weight.normal_(generator=gen)
        grn.bias.normal_(generator=gen)
    dense = GlobalResponseNorm(C, channels_last=False).double()
    dense.weight, dense.bias = grn.weight, grn.bias
    compare(grn, dense, x, active)
    # the batch matters: the same image in another batch gives the same output
    alone = densify(grn(sparsify(x[:1], active[:1])), (1, C, H, W))
    together = densify(grn(sparsify(x, active)), (B, C, H, W))[:1]
    assert torch.allclose(alone, together, rtol=1e-12, atol=1e-12)


def test_drop_path_drops_whole_images(case) -> None:
    x, active = case
    drop = SparseDropPath(0.5).train()
    torch.manual_seed(3)
    out = densify(drop(sparsify(x, active)), x.shape)
    masked = x * upsample_mask(active, H, W)
    for b in range(B):
        kept = torch.allclose(out[b], masked[b] * 2)
        dropped = torch.equal(out[b], torch.zeros_like(out[b]))
        assert kept or dropped, f"image {b} neither kept (x2) nor dropped"
    torch.manual_seed(3)
    expected = torch.empty(B, 1, 1, 1, dtype=x.dtype).bernoulli_(0.5) / 0.5  # timm's draw order
    assert torch.allclose(out, masked * expected)
    assert torch.equal(densify(drop.eval()(sparsify(x, active)), x.shape), masked)


def test_add_refuses_different_sites(case) -> None:
    x, active = case
    a = sparsify(x, active)
    other = active.clone()
    other[0] = ~other[0]
    b = sparsify(x, other, coordinate_manager=a.coordinate_manager)
    with pytest.raises(ValueError, match="different sites"):
        add(a, b)


def test_max_pool_is_over_visible_sites_only(case) -> None:
    """MaxPool2d(3, 2, 1) over the visible sites alone: with negative visible values next to masked
    sites the answer is negative there, where the max over the zero-filled map would be 0."""
    x, active = case
    x = -(x.abs() + 0.1)  # every visible value < 0
    got = densify(SparseMaxPool2d(3, 2)(sparsify(x, active)), (B, C, H // 2, W // 2))
    keep_in, keep_out = upsample_mask(active, H, W), upsample_mask(active, H // 2, W // 2)
    over_visible = F.max_pool2d(x.masked_fill(~keep_in, float("-inf")), 3, 2, padding=1)
    zero_filled = F.max_pool2d(x * keep_in, 3, 2, padding=1)
    assert torch.equal(got, torch.where(keep_out, over_visible, torch.zeros_like(got)))
    assert bool((got[keep_out.expand_as(got)] < 0).all())
    # the two maxima really differ here: visible output sites with a masked pixel in their window
    border = keep_out & (F.max_pool2d((~keep_in).double(), 3, 2, padding=1) > 0)
    assert border.any()
    assert bool((zero_filled[border.expand_as(got)] == 0).all())
