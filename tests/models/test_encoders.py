"""Sparse encoders == masked-dense reference == dense timm, at every stride."""

from __future__ import annotations

import pytest
import timm
import torch

import spark_me
from spark_me.sparse.tensor import upsample_mask

from .._fixtures import randomize
from .conftest import TINY, mask_for

RTOL = 1e-5


def max_rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def assert_maps_equal(got: list[torch.Tensor], ref: list[torch.Tensor], channels, images, rtol=RTOL) -> None:
    assert len(got) == len(ref) == 4
    b, _, h, w = images.shape
    for g, r, c, s in zip(got, ref, channels, (4, 8, 16, 32), strict=True):
        assert g.shape == r.shape == (b, c, h // s, w // s)
        assert max_rel_err(g, r) <= rtol, f"stride {s}: {max_rel_err(g, r):.2e}"


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("ratio", [0.0, 0.6, 0.9])
@pytest.mark.parametrize("arch", sorted(TINY))
def test_sparse_equals_masked_dense_float64(pair_factory, gen, arch: str, ratio: float, train: bool) -> None:
    """In float64 the two computations agree to rounding: the sparse one is exact, not approximate."""
    sparse, reference = pair_factory(arch)
    sparse.double().train(train)
    reference.double().train(train)
    images = torch.randn(3, 3, 64, 96, generator=gen, dtype=torch.float64)
    active = mask_for(images, ratio, gen)
    assert_maps_equal(sparse(images, active), reference(images, active), sparse.channels, images, rtol=1e-10)
    if train:  # BN running statistics were updated from the same (active) vectors
        ref_state = reference.model.state_dict()
        for name, a in sparse.state_dict().items():
            if "running" in name:
                assert torch.allclose(a, ref_state[name], rtol=1e-10, atol=1e-12), name


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("ratio", [0.0, 0.6])
@pytest.mark.parametrize("arch", sorted(TINY))
def test_sparse_equals_masked_dense_float32(
    pair_factory, gen, arch: str, ratio: float, train: bool, device: str
) -> None:
    """On every available device (CUDA: ME's GPU kernels vs cuDNN)."""
    sparse, reference = pair_factory(arch)
    sparse.to(device).train(train)
    reference.to(device).train(train)
    images = torch.randn(4, 3, 96, 128, generator=gen).to(device)
    active = mask_for(images, ratio, gen).to(device)
    assert_maps_equal(sparse(images, active), reference(images, active), sparse.channels, images)


@pytest.mark.parametrize(("arch", "size"), [("resnet18", (96, 32)), ("convnextv2_atto", (32, 160))])
def test_odd_shapes(pair_factory, gen, arch: str, size: tuple[int, int]) -> None:
    """Non-square images and grids with a single row/column of cells."""
    sparse, reference = pair_factory(arch)
    sparse.double()
    reference.double()
    images = torch.randn(2, 3, *size, generator=gen, dtype=torch.float64)
    active = mask_for(images, 0.5, gen)
    assert_maps_equal(sparse(images, active), reference(images, active), sparse.channels, images, rtol=1e-10)


def grad_mask(kind: str, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Nothing masked, 90 % masked, or a single visible cell per image (corners, an inner cell)."""
    b, _, h, w = images.shape
    if kind == "single":
        active = torch.zeros(b, h // 32, w // 32, dtype=torch.bool)
        active[0, 0, 0] = True
        active[1, 1, 3] = True
        active[2, 2, 4] = True
        return active
    return mask_for(images, {"none": 0.0, "0.9": 0.9}[kind], gen)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("mask", ["none", "0.9", "single"])
@pytest.mark.parametrize("arch", sorted(TINY))  # ResNet basic/bottleneck, ConvNeXt V1 (gamma), V2 (GRN)
def test_backward_equals_masked_dense_float64(pair_factory, gen, arch: str, mask: str, train: bool) -> None:
    """Gradients w.r.t. every parameter and the input agree with the reference's to float64
    rounding, on a non-square 96x160 image (a 3x5 grid of cells); masked pixels get none.

    Three images: with two, 90 % masked leaves train-mode BN so few sites that its Jacobian
    amplifies float64 rounding to ~1e-10 (ResNet-18: conditioning, not a difference)."""
    sparse, reference = pair_factory(arch)
    sparse.double().train(train)
    reference.double().train(train)
    images = torch.randn(3, 3, 96, 160, generator=gen, dtype=torch.float64)
    active = grad_mask(mask, images, gen)
    probes = None
    grads = []
    for model in (sparse, reference):
        x = images.clone().requires_grad_(True)
        maps = model(x, active)
        probes = probes or [torch.randn(m.shape, generator=gen, dtype=torch.float64) for m in maps]
        sum((m * p).sum() for m, p in zip(maps, probes, strict=True)).backward()
        grads.append((x.grad, {n: p.grad for n, p in model.named_parameters()}))
    (gx_s, gp_s), (gx_r, gp_r) = grads
    visible = upsample_mask(active, 96, 160)
    assert torch.equal(gx_s * ~visible, torch.zeros_like(gx_s))  # masked pixels get no gradient
    assert max_rel_err(gx_s, gx_r * visible) <= 1e-10
    assert gp_s.keys() == {n.removeprefix("model.") for n in gp_r if not n.startswith("model.head.")}
    for name, g in gp_s.items():
        ref = gp_r["model." + name]
        assert g is not None and ref is not None, name
        assert ref.abs().max() > 0, f"{name}: no gradient in the reference"
        assert max_rel_err(g, ref) <= 1e-10, f"{name}: {max_rel_err(g, ref):.2e}"


@pytest.mark.parametrize("arch", ["resnet18", "convnext_tiny", "convnextv2_atto"])
def test_drop_path_per_image_matches(pair_factory, gen, arch: str) -> None:
    """Stochastic depth drops whole images with torch's RNG, in the same order as timm's DropPath."""
    sparse, reference = pair_factory(arch, drop_path_rate=0.5)
    images = torch.randn(4, 3, 64, 64, generator=gen)
    active = mask_for(images, 0.6, gen)
    torch.manual_seed(7)
    got = sparse(images, active)
    torch.manual_seed(7)
    ref = reference(images, active)
    assert_maps_equal(got, ref, sparse.channels, images)
    torch.manual_seed(8)
    assert not torch.allclose(sparse(images, active)[-1], got[-1])  # it really is random


@pytest.mark.parametrize("arch", sorted(TINY))
def test_no_leakage_from_masked_pixels(pair_factory, gen, arch: str) -> None:
    """Huge changes at masked pixels leave visible features unchanged (float64: ME's CPU kernels
    accumulate in a run-dependent order, so equality is to rounding, not bitwise)."""
    sparse, _ = pair_factory(arch)
    sparse.double().eval()
    images = torch.randn(2, 3, 64, 96, generator=gen, dtype=torch.float64)
    active = mask_for(images, 0.6, gen)
    noise = torch.randn(images.shape, generator=gen, dtype=torch.float64) * 1e6
    changed = images + noise * ~upsample_mask(active, 64, 96)
    for a, b, s in zip(sparse(images, active), sparse(changed, active), (4, 8, 16, 32), strict=True):
        assert max_rel_err(b, a) <= 1e-12, f"stride {s}"
        hidden = ~upsample_mask(active, a.shape[2], a.shape[3])
        assert torch.equal(a * hidden, torch.zeros_like(a))


@pytest.mark.parametrize("arch", sorted(TINY))
def test_mask_ratio_zero_equals_dense_timm(gen, arch: str) -> None:
    """Nothing masked, BN in eval mode: the sparse encoder computes timm's dense features."""
    sparse = spark_me.create_encoder(arch, **TINY[arch]).eval()
    randomize(sparse, gen)
    dense = timm.create_model(arch, num_classes=0, **TINY[arch]).eval()
    dense.load_state_dict(sparse.state_dict(), strict=False)
    images = torch.randn(2, 3, 64, 96, generator=gen)
    indices = [1, 2, 3, 4] if arch.startswith("resnet") else [0, 1, 2, 3]
    with torch.no_grad():
        expected = dense.forward_intermediates(images, indices=indices, intermediates_only=True)
        got = sparse(images, torch.ones(2, 2, 3, dtype=torch.bool))
    assert_maps_equal(got, expected, sparse.channels, images)


def test_bad_inputs_are_refused(pair_factory) -> None:
    sparse, _ = pair_factory("resnet18")
    with pytest.raises(ValueError, match="multiple of 32"):
        sparse(torch.randn(1, 3, 60, 64), torch.ones(1, 1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask shape"):
        sparse(torch.randn(1, 3, 64, 64), torch.ones(1, 3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least one visible"):
        one_empty = torch.tensor([[[1, 0], [0, 0]], [[0, 0], [0, 0]]], dtype=torch.bool)
        sparse(torch.randn(2, 3, 64, 64), one_empty)


def test_deepcopy_and_state_dict_round_trip(pair_factory, gen, tmp_path) -> None:
    """EMA copies and checkpoints need both; ME's own pooling module cannot be deep-copied."""
    import copy

    sparse, _ = pair_factory("resnet18")
    sparse.eval()
    images = torch.randn(1, 3, 64, 64, generator=gen)
    active = mask_for(images, 0.5, gen)
    clone = copy.deepcopy(sparse)
    torch.save(sparse.state_dict(), tmp_path / "enc.pth")
    fresh = spark_me.create_encoder("resnet18").eval()
    fresh.load_state_dict(torch.load(tmp_path / "enc.pth", weights_only=True))
    expected = sparse(images, active)
    for other in (clone, fresh):
        for a, b in zip(other(images, active), expected, strict=True):
            assert max_rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("amp", ["none", "bf16"])
@pytest.mark.parametrize("arch", sorted(TINY))
def test_gradients_arrive_in_their_parameters_layout(pair_factory, gen, arch: str, amp: str) -> None:
    """Every gradient the backward hands to autograd has its parameter's strides (channels-last conv
    weights included), so AccumulateGrad and DDP's buckets take it without a copy (DDP warns
    "Grad strides do not match bucket view strides" otherwise)."""
    sparse, _ = pair_factory(arch)
    mismatched = []
    for name, p in sparse.named_parameters():
        p.register_hook(lambda g, p=p, n=name: mismatched.append(n) if g.stride() != p.stride() else None)
    images = torch.randn(2, 3, 64, 96, generator=gen)
    active = mask_for(images, 0.5, gen)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
        maps = sparse(images, active)
    sum(m.float().sum() for m in maps).backward()
    assert not mismatched, mismatched
