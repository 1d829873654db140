"""The op zoo: every handler family that the 17 timm families of test_generic.py do not exercise,
inside small CNNs of one's own, against the independent masked-dense oracle (float64, 1e-10).

Why: the family matrix only reaches the ops timm's models happen to call (and with their arguments:
no group_norm, no nearest upsampling, no channel shuffle, no count_include_pad=False, no reductions
over the channels, ...). Each zoo below is a 4-stage CNN (strides 4, 8, 16, 32, the TinyCNN pattern)
whose stages call one group of such ops between convolutions; it must give the oracle's maps, every
parameter gradient, in train and eval mode, on odd non-square grids (64x96, 96x160) with masks 0.6,
0.9 and a single visible cell per image, and the plain dense model's at mask 0.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn

import spark_me
from spark_me.masking import random_mask
from spark_me.models.masked_dense import masked_dense_features, stage_outputs

from ._compare import (
    assert_buffers_close,
    assert_grads_close,
    assert_maps_close,
    assert_zero_at_masked,
    backward,
    probes_for,
)

TOL = 1e-10
STAGES = ["s4", "s8", "s16", "s32"]
WIDTHS = (8, 16, 16, 24)


def _conv(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=bias)


class Zoo(nn.Module):
    """Stem (3x3 s2, then `down`) to stride 4, then three stride-2 stages; each stage's `down`
    (cin -> cout, stride 2) is followed by `mid(cout, stride)`, the ops under test."""

    def __init__(self, mid: Callable[[int, int], nn.Module], down: Callable[[int, int, int], nn.Module]):
        super().__init__()
        strides = (4, 8, 16, 32)
        self.stem = nn.Sequential(_conv(3, WIDTHS[0], stride=2, bias=True), nn.ReLU())
        cins = (WIDTHS[0], *WIDTHS[:-1])
        for name, cin, cout, s in zip(STAGES, cins, WIDTHS, strides, strict=True):
            self.add_module(name, nn.Sequential(down(cin, cout, s), mid(cout, s)))

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for name in STAGES:
            x = getattr(self, name)(x)
        return x


def _plain_down(cin: int, cout: int, stride: int) -> nn.Module:
    return nn.Sequential(_conv(cin, cout, stride=2), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


# --- the zoos ---------------------------------------------------------------------------------------
class GroupNormShuffle(nn.Module):
    """group_norm (affine and not), channel shuffle (view, transpose, contiguous, view), grouped convs."""

    def __init__(self, c: int, stride: int):
        super().__init__()
        self.gn = nn.GroupNorm(4, c)
        self.conv2 = _conv(c, c, groups=2)
        self.conv4 = _conv(c, c, groups=4, bias=True)
        self.pw = _conv(c, c, k=1, groups=2)  # a grouped 1x1: not the pointwise GEMM

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = F.silu(self.gn(x))
        y = y.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(b, c, h, w)
        y = self.conv2(y)
        y = F.group_norm(y, 2, eps=1e-3)
        y = y.reshape(b, 4, -1, h, w).transpose(1, 2).reshape(b, c, h, w)
        return x + self.pw(self.conv4(y))


class Upsample(nn.Module):
    """Nearest upsampling by scale_factor=2 and by size= (from stride 2s, and 4s) added back."""

    def __init__(self, c: int, stride: int):
        super().__init__()
        self.stride = stride
        self.down = _conv(c, c, stride=2, bias=True) if stride < 32 else None
        self.down2 = _conv(c, c, stride=2) if stride <= 8 else None

    def forward(self, x: Tensor) -> Tensor:
        same = F.interpolate(x, size=x.shape[-2:])  # a new tensor, not `x`: changing it leaves x alone
        same.mul_(0.5)
        if self.stride == 32:
            return x + same
        z = F.relu(self.down(x))
        y = same + x + F.interpolate(z, scale_factor=2, mode="nearest")
        y = y * F.interpolate(z.sigmoid(), size=x.shape[-2:])
        if self.stride <= 8:
            z2 = self.down2(z)
            y = y - F.interpolate(z2, scale_factor=4.0) + F.interpolate(z2, size=(x.shape[2], x.shape[3]))
        return y


class ChannelsLast(nn.Module):
    """ConvNeXt-style MLP on channels-last: LayerNorm, Linear, cat / split / chunk / slices, [C] scale."""

    def __init__(self, c: int, stride: int):
        super().__init__()
        self.norm = nn.LayerNorm(c)
        self.fc1 = nn.Linear(c, 2 * c)
        self.fc2 = nn.Linear(c, c, bias=False)
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, c))
        self.norm2 = nn.LayerNorm(c // 2, elementwise_affine=False)

    def forward(self, x: Tensor) -> Tensor:
        c = x.shape[1]
        y = self.norm(x.permute(0, 2, 3, 1))
        a, g = self.fc1(y).chunk(2, dim=-1)
        y = a * F.gelu(g)
        lo, hi = y.split([c // 4, c - c // 4], dim=3)
        y = torch.cat([hi, lo * 2.0], dim=-1)
        y = torch.cat([self.norm2(y[..., : c // 2]), y[..., c // 2 :]], dim=3)
        y = self.fc2(y * self.gamma)
        z = x[:, c // 4 : c // 2]
        return x + y.permute(0, 3, 1, 2) + torch.cat([z, z, z, z], dim=1)


class Reductions(nn.Module):
    """Spatial reductions (amax / sum / mean / norm / vector_norm, keepdim or not; global pools)
    and the same over the channel dim, used as gates and offsets."""

    def __init__(self, c: int, stride: int):
        super().__init__()
        self.conv = _conv(c, c, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.conv(x)
        spatial = (
            y.amax((2, 3), keepdim=True)
            + 0.01 * y.sum((2, 3)).view(b, c, 1, 1)
            + y.norm(p=2, dim=(2, 3), keepdim=True)
            - torch.linalg.vector_norm(y, dim=(-2, -1))[:, :, None, None]
            + torch.sum(y, dim=(-1, -2), keepdim=True) * 0.02
            + y.mean((2, 3)).view(b, c, 1, 1)
            + y.amax(dim=(3, 2)).view(b, c, 1, 1) * 0.5
            + y.norm(dim=(2, 3)).view(b, c, 1, 1) * 0.1
            + F.adaptive_avg_pool2d(y, 1)
            - F.adaptive_max_pool2d(y, (1, 1))
        )
        per_site = (
            y.amax(1, keepdim=True)
            - y.norm(p=2, dim=1, keepdim=True) * 0.5
            + torch.linalg.vector_norm(y, 2, dim=1).view(b, 1, h, w) * 0.1
            + y.sum(1, keepdim=True) * 0.01
            + y.mean(dim=1).view(b, 1, h, w)
            + y.amax(1).view(b, 1, h, w)
        )
        return x * torch.sigmoid(spatial) + y * per_site.tanh()


class Pools(nn.Module):
    """Stride-1 3x3 average pools (count_include_pad both ways) around a conv."""

    def __init__(self, c: int, stride: int):
        super().__init__()
        self.conv = _conv(c, c)

    def forward(self, x: Tensor) -> Tensor:
        one = F.avg_pool2d(x, 1)  # a new tensor, not `x`: changing it leaves x alone
        one.mul_(0.1)
        a = F.avg_pool2d(x, 3, 1, 1)
        b = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        return self.conv(a) + b * 0.5 + one + F.max_pool2d(x, 3, 1, 1) * 0.3


class PoolDown(nn.Module):
    """A stride-2 pool per stage: max 3x3/2 (pad 1); avg 3x3/2 pad 1 both count_include_pad; avg
    2x2/2 ceil_mode; max 2x2/2; then a 1x1 conv to the stage width."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride = stride
        self.proj = _conv(cin, cout, k=1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        if self.stride == 4:
            x = F.max_pool2d(x, 3, 2, 1)
        elif self.stride == 8:
            x = F.avg_pool2d(x, 3, 2, 1) + 0.5 * F.avg_pool2d(x, 3, 2, 1, count_include_pad=False)
        elif self.stride == 16:
            x = F.avg_pool2d(x, 2, 2, ceil_mode=True, count_include_pad=False)
        else:
            x = F.max_pool2d(x, kernel_size=2, stride=2) - F.avg_pool2d(x, (2, 2), ceil_mode=True)
        return F.relu(self.proj(x))


class StdConv(nn.Conv2d):
    """Weight standardisation: the conv's weight is computed in forward (as timm's StdConv2d)."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        return F.conv2d(x, (w - mean) / (var + 1e-5).sqrt(), self.bias, self.stride, self.padding)


class Convs(nn.Module):
    """Grouped 3x3 (2 and 4 groups), weight-standardised 3x3, 1x1 and 3x3 with bias."""

    def __init__(self, c: int, stride: int):
        super().__init__()
        self.g2 = _conv(c, c, groups=2)
        self.g4 = _conv(c, c, groups=4, bias=True)
        self.std = StdConv(c, c, 3, 1, 1, bias=True)
        self.pw = _conv(c, c, k=1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.pw(F.silu(self.std(F.relu(self.g4(self.g2(x))))))


def _depthwise_down(cin: int, cout: int, stride: int) -> nn.Module:
    """Depthwise 5x5 stride 2 (with bias), then a 1x1 to the stage width."""
    return nn.Sequential(
        nn.Conv2d(cin, cin, 5, 2, 2, groups=cin, bias=True), nn.Hardswish(), _conv(cin, cout, k=1)
    )


class Pointwise(nn.Module):
    """expand_as of a per-image gate, torch.where with a sparse condition, in-place ops (incl. an
    alias of the value changed in place), broadcasts [1, C, 1, 1] / [B, C, 1, 1] / [C] on channels-
    last, dropout p=0, drop-path."""

    def __init__(self, c: int, stride: int):
        super().__init__()
        self.conv_a = _conv(c, c)
        self.conv_b = _conv(c, c, bias=True)
        self.shift = nn.Parameter(torch.linspace(-0.5, 0.5, c).view(1, c, 1, 1))
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, c))
        self.drop = nn.Dropout(0.0)
        self.drop_path = DropPath(0.5)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv_a(x)
        shortcut = y
        y.relu_()  # the alias `shortcut` is the same value: relu'd too
        y = self.conv_b(y) + shortcut
        y += self.shift  # [1, C, 1, 1]
        y.add_(x, alpha=0.5)
        gate = torch.sigmoid(y.mean((2, 3), keepdim=True))  # [B, C, 1, 1]
        y = y * gate.expand_as(y)
        y.mul_(gate + 1.0)
        y.sub_(0.2).mul_(1.5)
        y = torch.where(y > 0.1, y, y * 0.3 - gate)
        y = F.relu(y, inplace=True) + shortcut
        y = F.hardswish(y, inplace=True)
        z = y.permute(0, 2, 3, 1) * self.scale  # [C] on channels-last
        y = F.dropout(z, p=0.0, training=self.training).permute(0, 3, 1, 2)
        return x + self.drop_path(self.drop(y))


class InPlaceViews(nn.Module):
    """In-place ops through views, as torch has them: a slice, a channel view and a permute of a
    map share its storage, so an in-place op on any of them changes the others."""

    def __init__(self, c: int, stride: int):
        super().__init__()
        self.conv = _conv(c, c, bias=True)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, c))

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        b, c, h, w = y.shape
        head = y[:, : c // 2]
        y.mul_(1.5)  # `head` is scaled too
        y.view(b, 2, c // 2, h, w)[:, 1:].add_(0.25)  # the second half of y
        y.permute(0, 2, 3, 1).mul_(self.scale)  # y itself, per channel
        y[:, c // 4 :].relu_()
        return x + y + torch.cat([head, head], 1)


ZOOS: dict[str, Callable[[], nn.Module]] = {
    "groupnorm_shuffle": lambda: Zoo(GroupNormShuffle, _plain_down),
    "upsample": lambda: Zoo(Upsample, _plain_down),
    "channels_last": lambda: Zoo(ChannelsLast, _plain_down),
    "reductions": lambda: Zoo(Reductions, _plain_down),
    "pools": lambda: Zoo(Pools, PoolDown),
    "convs": lambda: Zoo(Convs, _depthwise_down),
    "pointwise": lambda: Zoo(Pointwise, _plain_down),
    "inplace_views": lambda: Zoo(InPlaceViews, _plain_down),
}

CASES = {  # name: (batch, height, width, mask ratio or "single")
    "64x96-0.6": (3, 64, 96, 0.6),
    "96x160-0.9": (3, 96, 160, 0.9),
    "96x160-single": (2, 96, 160, "single"),
}


def _mask(batch: int, h: int, w: int, ratio, gen: torch.Generator) -> Tensor:
    if ratio != "single":
        return random_mask(batch, h, w, ratio, generator=gen)
    active = torch.zeros(batch, h // 32, w // 32, dtype=torch.bool)
    for i in range(batch):  # one visible cell: a corner, then an inner cell
        active[i, i % (h // 32), (2 * i) % (w // 32)] = True
    return active


def _pair(name: str, dataflow: str = "rules") -> tuple[nn.Module, nn.Module, nn.Module]:
    """(encoder, its model, an independent copy for the oracle), float64, non-trivial BN."""
    torch.manual_seed(0)
    model = ZOOS[name]().double()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d | nn.GroupNorm | nn.LayerNorm) and module.weight is not None:
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    other = copy.deepcopy(model)
    enc = spark_me.create_encoder(model, stages=STAGES, dataflow=dataflow)
    assert enc.dropped == []
    return enc, model, other


def _compare(enc, model, other, images: Tensor, active: Tensor, train: bool, gen, oracle: bool) -> None:
    """Maps, zeros at masked sites, every parameter gradient, BN statistics; `oracle` False: the
    plain dense model (mask 0)."""
    enc.train(train)
    other.train(train)
    model.zero_grad()
    other.zero_grad()
    torch.manual_seed(7)  # drop-path draws the same per-image mask on both sides
    got = list(enc(images, active))
    torch.manual_seed(7)
    if oracle:
        want = masked_dense_features(other, STAGES, images, active)
    else:
        want = stage_outputs(other, STAGES, images)
    assert_maps_close(got, want, TOL, f"train={train}")
    assert_zero_at_masked(got, active)
    probes = probes_for(want, gen)
    backward(got, probes)
    backward(want, probes)
    assert_grads_close(model, other, TOL)
    assert all(p.grad is not None for p in model.parameters()), "a parameter got no gradient"
    if train:
        assert_buffers_close(model, other, TOL)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", sorted(ZOOS))
def test_zoo_equals_oracle(gen, name: str, case: str) -> None:
    batch, h, w, ratio = CASES[case]
    enc, model, other = _pair(name)
    images = torch.randn(batch, 3, h, w, generator=gen, dtype=torch.float64)
    active = _mask(batch, h, w, ratio, gen)
    # train-mode BN over the one site per image of a stride-32 map is undefined noise: eval only there
    if ratio != "single" or not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        _compare(enc, model, other, images, active, True, gen, oracle=True)
    _compare(enc, model, other, images, active, False, gen, oracle=True)


@pytest.mark.parametrize("name", sorted(ZOOS))
def test_zoo_mask_zero_equals_dense(gen, name: str) -> None:
    enc, model, other = _pair(name)
    images = torch.randn(2, 3, 96, 64, generator=gen, dtype=torch.float64)
    _compare(enc, model, other, images, torch.ones(2, 3, 2, dtype=torch.bool), True, gen, oracle=False)


@pytest.mark.parametrize("dataflow", ["block", "dense", "gemm", "me"])
def test_in_place_ops_on_the_output_of_every_dataflow(gen, dataflow: str) -> None:
    """In-place ops write into a conv's output rows whichever dataflow made them (the block
    dataflow's rows are a view made inside its autograd Function, where torch forbids in-place)."""
    enc, model, other = _pair("inplace_views", dataflow)
    images = torch.randn(2, 3, 64, 96, generator=gen, dtype=torch.float64)
    active = _mask(2, 64, 96, 0.6, gen)
    _compare(enc, model, other, images, active, True, gen, oracle=True)
