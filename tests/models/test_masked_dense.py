"""The masked-dense oracle itself (tests/models/masked_dense.py) is right: it is the reference of the
generic sparse path, so it must be checked independently of it.

(a) nothing masked: it is the plain timm model; (b) on ResNet / ConvNeXt it equals the project's
hand-written masked-dense emulation (SparK's original); (c) properties any wrong rule breaks:
masked sites exactly 0, masked pixels without influence, each op's semantics against a direct
computation on the visible sites, and a loud error for anything it does not know.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spark_me
from spark_me.masking import random_mask
from spark_me.models.masked_dense import (
    MaskedDenseMode,
    Unsupported,
    masked_dense_features,
    stage_modules_of,
    stage_outputs,
)
from spark_me.models.masked_dense.axes import Axes

from .._fixtures import randomize
from ._compare import (
    assert_buffers_close,
    assert_grads_close,
    assert_maps_close,
    assert_zero_at_masked,
    backward,
    probes_for,
)
from ._families import FAMILIES, TRAIN_TOL, build
from .conftest import TINY


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_mask_zero_is_the_dense_model(gen, name: str) -> None:
    """Stage maps and every parameter gradient, float64. Eval mode: to 1e-12. Train mode (BN batch
    statistics, running-stat updates): to 1e-10, because the oracle's BN sums the visible sites in
    another order than torch's dense kernel, and train-mode BN over the 12 sites of a stride-32 map
    amplifies that rounding (measured up to 1.1e-12 on maps, 2e-11 on gradients: efficientnet_lite0,
    mobilenetv2_100; below 1e-13 for most families)."""
    oracle_model = build(name, gen)
    dense = copy.deepcopy(oracle_model)
    stages = stage_modules_of(oracle_model)
    images = torch.randn(2, 3, 64, 96, generator=gen, dtype=torch.float64)
    for train, tol in ((False, 1e-12), (True, TRAIN_TOL.get(name, 1e-10))):
        oracle_model.train(train).zero_grad()
        dense.train(train).zero_grad()
        got = masked_dense_features(oracle_model, stages, images, torch.ones(2, 2, 3, dtype=torch.bool))
        want = stage_outputs(dense, stages, images)
        assert_maps_close(got, want, tol, f"{name} train={train}")
        probes = probes_for(want, gen)
        backward(got, probes)
        backward(want, probes)
        assert_grads_close(oracle_model, dense, tol)
        assert_buffers_close(oracle_model, dense, tol)


def _spark_pair(arch: str, gen: torch.Generator) -> tuple[nn.Module, nn.Module]:
    reference = spark_me.create_reference(arch, **TINY[arch]).double()
    randomize(reference, gen)
    return reference, copy.deepcopy(reference.model)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("ratio", [0.6, 0.9])
@pytest.mark.parametrize(
    ("arch", "size"),
    [
        ("resnet18", (64, 96)),
        ("resnet50", (96, 64)),
        ("convnext_atto", (96, 160)),
        ("convnextv2_atto", (96, 160)),
    ],
)
def test_equals_sparks_emulation(gen, arch: str, size: tuple[int, int], ratio: float, train: bool) -> None:
    """The project's hand-written masked-dense ResNet / ConvNeXt (spark_me.create_reference):
    same maps, same gradient of every parameter, same BN running statistics, float64."""
    reference, oracle_model = _spark_pair(arch, gen)
    reference.train(train)
    oracle_model.train(train)
    images = torch.randn(3, 3, *size, generator=gen, dtype=torch.float64)
    active = random_mask(3, *size, ratio, generator=gen)
    want = reference(images, active)
    got = masked_dense_features(oracle_model, stage_modules_of(oracle_model), images, active)
    assert_maps_close(got, want, 1e-10, arch)
    assert_zero_at_masked(got, active)
    probes = probes_for(want, gen)
    backward(got, probes)
    backward(want, probes)
    assert_grads_close(oracle_model, reference.model, 1e-10)
    assert_buffers_close(oracle_model, reference.model, 1e-10)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "name", ["efficientnet_b0", "densenet121", "dla34", "ghostnet_100", "convnextv2_atto"]
)
def test_masked_pixels_have_no_influence(gen, name: str, train: bool) -> None:
    """Maps are exactly 0 at masked sites, and huge changes of masked pixels change no bit of them."""
    model = build(name, gen).train(train)
    stages = stage_modules_of(model)
    images = torch.randn(2, 3, 96, 64, generator=gen, dtype=torch.float64)
    active = random_mask(2, 96, 64, 0.6, generator=gen)
    hidden = ~active.repeat_interleave(32, 1).repeat_interleave(32, 2)[:, None]
    changed = images + 1e6 * torch.randn(images.shape, generator=gen, dtype=torch.float64) * hidden
    first = masked_dense_features(model, stages, images, active)
    assert_zero_at_masked(first, active)
    for a, b in zip(first, masked_dense_features(model, stages, changed, active), strict=True):
        assert torch.equal(a, b)


# --- single ops against direct computations on the visible sites ---------------------------------------
GRID = torch.tensor([[[1, 0, 0], [0, 1, 1]], [[0, 0, 1], [0, 0, 0]]], dtype=torch.bool)  # 2 images, 2x3 cells
CF = Axes(0, 2, 3, 4)


def _map(mode: MaskedDenseMode, stride: int, channels: int = 4, seed: int = 0) -> torch.Tensor:
    """A [2, C, 64/s, 96/s] float64 map entered into `mode` (masked sites zeroed)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, channels, 64 // stride, 96 // stride, generator=g, dtype=torch.float64)
    return mode.enter(x, CF)


def _visible(stride: int) -> torch.Tensor:
    r = 32 // stride
    return GRID.repeat_interleave(r, 1).repeat_interleave(r, 2)  # [2, H, W]


def test_max_pool_ignores_masked_sites() -> None:
    """All values negative: a pool reading masked sites as 0 would output 0 near them."""
    mode = MaskedDenseMode(GRID)
    with mode:
        x = _map(mode, 8) - 10.0
        y = F.max_pool2d(x, 3, 2, 1)
    x, vis, out_vis = x.detach(), _visible(8), _visible(16)
    for b, c, i, j in torch.nonzero(out_vis[:, None].expand(-1, 4, -1, -1)).tolist():
        window = [
            x[b, c, u, v]
            for u in range(2 * i - 1, 2 * i + 2)
            for v in range(2 * j - 1, 2 * j + 2)
            if 0 <= u < x.shape[2] and 0 <= v < x.shape[3] and vis[b, u, v]
        ]
        assert y[b, c, i, j] == max(window)
    assert torch.equal(y * ~out_vis[:, None], torch.zeros_like(y))


def test_spatial_mean_and_adaptive_pool_use_visible_sites() -> None:
    mode = MaskedDenseMode(GRID)
    with mode:
        x = _map(mode, 4)
        means = x.mean((2, 3), keepdim=True)  # squeeze-excite
        pooled = F.adaptive_avg_pool2d(x, 1)
        peak = x.amax((2, 3))
        pooled_max = F.adaptive_max_pool2d(x - 10.0, 1)  # negative: masked zeros must not win
        gated = x * means.sigmoid()  # per-image broadcast, a map again
    vis = _visible(4)
    for b in range(2):
        sites = x[b][:, vis[b]]  # [C, visible sites]
        assert torch.allclose(means[b, :, 0, 0], sites.mean(1), rtol=1e-13, atol=0)
        assert torch.allclose(pooled[b, :, 0, 0], sites.mean(1), rtol=1e-13, atol=0)
        assert torch.equal(peak[b], sites.amax(1))
        assert torch.equal(pooled_max[b, :, 0, 0], (sites - 10.0).amax(1))
    assert mode.axes(gated) == CF and mode.axes(means) is None


def test_batch_norm_train_uses_visible_sites_of_the_batch() -> None:
    bn = nn.BatchNorm2d(4, momentum=0.3).double().train()
    mode = MaskedDenseMode(GRID)
    with mode:
        x = _map(mode, 8)
        y = bn(x)
    vectors = x.detach().permute(0, 2, 3, 1)[_visible(8)]  # [N, C]
    mean, var = vectors.mean(0), vectors.var(0, unbiased=False)
    expected = (vectors - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias
    assert torch.allclose(y.detach().permute(0, 2, 3, 1)[_visible(8)], expected, rtol=1e-12, atol=1e-12)
    assert torch.allclose(bn.running_mean, 0.3 * mean, rtol=1e-12)
    assert torch.allclose(bn.running_var, 0.7 + 0.3 * vectors.var(0, unbiased=True), rtol=1e-12)


def test_group_norm_and_channels_last_layer_norm() -> None:
    gn = nn.GroupNorm(2, 4).double()
    ln = nn.LayerNorm(4).double()
    mode = MaskedDenseMode(GRID)
    with mode:
        x = _map(mode, 4)
        y = gn(x)
        z = ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    vis = _visible(4)
    for b in range(2):
        for group in (slice(0, 2), slice(2, 4)):
            sites = x[b, group][:, vis[b]]
            normed = (sites - sites.mean()) / torch.sqrt(sites.var(unbiased=False) + gn.eps)
            want = normed * gn.weight[group, None] + gn.bias[group, None]
            assert torch.allclose(y[b, group][:, vis[b]], want, rtol=1e-12, atol=1e-12)
    expected = F.layer_norm(x.detach().permute(0, 2, 3, 1)[vis], (4,), ln.weight, ln.bias)
    assert torch.allclose(z.permute(0, 2, 3, 1)[vis], expected, rtol=1e-13, atol=0)
    for out in (y, z):
        assert torch.equal(out * ~vis[:, None], torch.zeros_like(out))


def test_shape_ops_follow_the_map() -> None:
    """Channel shuffle, cat, split, channel slicing, nearest upsampling: maps with the dense values
    at visible sites and exact zeros elsewhere."""
    mode = MaskedDenseMode(GRID)
    with mode:
        x = _map(mode, 8, channels=6)
        shuffled = x.view(2, 2, 3, 8, 12).transpose(1, 2).contiguous().view(2, 6, 8, 12)
        a, b = shuffled.split(3, dim=1)
        joined = torch.cat([b, a[:, :2]], dim=1)
        up = F.interpolate(joined, scale_factor=2, mode="nearest")
        picked = x[:, 2].unsqueeze(1)  # [B, H, W] map, then channels-first again
    dense = x.detach()
    want = F.interpolate(dense[:, [4, 2, 5, 0, 3]], scale_factor=2.0)  # shuffled order 0 3 1 4 2 5
    assert mode.axes(up) == CF and mode.axes(picked) == CF
    assert torch.equal(up, want)  # x is 0 at masked sites, upsampling keeps the cells
    assert torch.equal(picked, dense[:, 2:3])


def test_eca_gate_from_a_pooled_vector() -> None:
    """ECA: a conv1d over the channels of the per-image mean, expanded back over the map."""
    conv = nn.Conv1d(1, 1, 3, padding=1, bias=False).double()
    mode = MaskedDenseMode(GRID)
    with mode:
        x = _map(mode, 16)
        y = torch.sigmoid(conv(x.mean((2, 3)).view(2, 1, -1))).view(2, -1, 1, 1)
        out = x * y.expand_as(x)
    vis = _visible(16)
    means = torch.stack([x[b][:, vis[b]].mean(1) for b in range(2)])  # [B, C] over visible sites
    gate = torch.sigmoid(conv(means[:, None]))[:, 0, :, None, None]
    assert mode.axes(out) == CF
    assert torch.allclose(out, x * gate, rtol=1e-13, atol=0)


# --- anything unknown raises -----------------------------------------------------------------------------
UNKNOWN = {
    "pad": lambda x: F.pad(x, (1, 1, 1, 1)),
    "flatten spatial": lambda x: x.flatten(2),
    "mean over the batch": lambda x: x.mean(),
    "sum over one spatial axis": lambda x: x.sum(2),
    "variance": lambda x: x.var((2, 3)),
    "cumsum": lambda x: torch.cumsum(x, 3),
    "spatial slicing": lambda x: x[:, :, 1:],
    "bilinear": lambda x: F.interpolate(x, scale_factor=2, mode="bilinear"),
    "roll": lambda x: torch.roll(x, 1, 2),
    "full-size non-map operand": lambda x: x + torch.ones(1, 1, 8, 12, dtype=x.dtype),
    "maps of two strides": lambda x: x[:, :, :4, :6] + F.avg_pool2d(x, 2),
    "max": lambda x: x.max(),
    "spatial weight": lambda x: F.conv2d(torch.ones(1, 4, 8, 8, dtype=x.dtype), x[:1, :, :3, :3]),
    "data-dependent branch": lambda x: bool(x.sum() > 0),
}


@pytest.mark.parametrize("what", sorted(UNKNOWN))
def test_unknown_op_raises(what: str) -> None:
    mode = MaskedDenseMode(GRID)
    with mode, pytest.raises(Unsupported, match="masked-dense oracle"):
        UNKNOWN[what](_map(mode, 8))


class _Padded(nn.Module):
    """A CNN whose second stage pads its map: the oracle names the op and the module."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 4, 4)
        self.s8 = nn.Conv2d(4, 4, 2, 2)
        self.s16 = nn.Conv2d(4, 4, 2, 2)
        self.s32 = nn.Conv2d(4, 4, 2, 2)

    def forward(self, x):
        x = self.stem(x)
        x = self.s8(F.pad(x, (0, 0, 0, 0)))
        return self.s32(self.s16(x))


def test_unknown_op_in_a_model_names_op_and_module() -> None:
    model = _Padded().double()
    images = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    with pytest.raises(Unsupported, match=r"no rule for pad .*module '<root>'"):
        masked_dense_features(model, ["stem", "s8", "s16", "s32"], images, GRID)


def test_stage_modules_are_the_last_of_each_reduction() -> None:
    """From timm's feature_info (ResNet also lists act1 at 2; DenseNet's stride-32 map is norm5;
    EfficientNet lists only some blocks); of two modules at one reduction, the later."""
    gen = torch.Generator().manual_seed(0)
    assert stage_modules_of(build("resnet50d", gen)) == ["layer1", "layer2", "layer3", "layer4"]
    assert stage_modules_of(build("efficientnet_b0", gen)) == ["blocks.1", "blocks.2", "blocks.4", "blocks.6"]
    assert stage_modules_of(build("densenet121", gen))[-1] == "features.norm5"
    assert stage_modules_of(build("dla34", gen)) == ["level2", "level3", "level4", "level5"]
    info = [
        dict(module=n, reduction=r) for n, r in [("a", 2), ("b", 4), ("c", 4), ("d", 8), ("e", 16), ("f", 32)]
    ]
    assert stage_modules_of(type("M", (), {"feature_info": info})()) == ["c", "d", "e", "f"]
    with pytest.raises(ValueError, match="reduction 4"):
        stage_modules_of(type("M", (), {"feature_info": info[:1]})())
