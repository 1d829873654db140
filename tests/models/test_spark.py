"""The SparK model: densify, decoder, loss on masked patches only, learning, reconstructions."""

from __future__ import annotations

import pytest
import torch

import spark_me
from spark_me.models.spark import normalized_patches, patchify, unpatchify
from spark_me.sparse.tensor import densify, upsample_mask

from .._fixtures import randomize
from .conftest import TINY


def small_spark(arch: str = "convnextv2_atto", encoder_kw: dict | None = None, **kw) -> spark_me.SparK:
    encoder = spark_me.create_encoder(arch, **(TINY[arch] | (encoder_kw or {})))
    return spark_me.SparK(encoder, decoder_width=64, **kw)


def test_patchify_round_trip_and_order(gen) -> None:
    images = torch.randn(2, 3, 64, 96, generator=gen)
    patches = patchify(images)
    assert patches.shape == (2, 6, 32 * 32 * 3)
    assert torch.equal(unpatchify(patches, 64, 96), images)
    # patch l is the cell (l // 3, l % 3) of the grid, as in active.flatten(1)
    assert torch.equal(patches[1, 4].reshape(32, 32, 3).permute(2, 0, 1), images[1, :, 32:64, 32:64])


def test_normalised_target_undoes(gen) -> None:
    images = torch.randn(2, 3, 64, 64, generator=gen) * 3 + 1
    target, mean, std = normalized_patches(images)
    assert torch.allclose(target.mean(-1), torch.zeros(2, 4), atol=1e-5)
    assert torch.allclose(target.var(-1), torch.ones(2, 4), atol=1e-4)
    assert torch.allclose(unpatchify(target * std + mean, 64, 64), images, atol=1e-5)


def test_loss_counts_masked_patches_only(gen) -> None:
    model = small_spark()
    images = torch.randn(2, 3, 64, 96, generator=gen)
    active = spark_me.random_mask(2, 64, 96, 0.5, generator=gen)
    pred = torch.randn(images.shape, generator=gen)
    base = model.loss(images, pred, active)
    visible = upsample_mask(active, 64, 96)
    assert torch.equal(model.loss(images, pred + 100 * visible, active), base)
    assert not torch.equal(model.loss(images, pred + 100 * ~visible, active), base)
    # a perfect prediction of the normalised target at masked patches gives zero loss
    target, _, _ = normalized_patches(images)
    assert model.loss(images, unpatchify(target, 64, 96), active) == pytest.approx(0.0, abs=1e-10)
    # and it is the mean over masked patches of the per-patch MSE
    per_patch = (patchify(pred) - target).pow(2).mean(-1)
    masked = ~active.flatten(1)
    assert base == pytest.approx(float(per_patch[masked].mean()), rel=1e-5)


@pytest.mark.parametrize("arch", ["resnet18", "convnextv2_atto"])
def test_densify_puts_exactly_the_mask_token_at_masked_sites(gen, arch: str) -> None:
    """Before each projection: the scale's mask token, bit for bit, at every masked site; the
    normalised sparse features at every visible site."""
    model = small_spark(arch).eval()
    randomize(model, gen)  # mask tokens and norms away from 0 (a token of 0 would equal a zero fill)
    images = torch.randn(2, 3, 64, 96, generator=gen)
    active = spark_me.random_mask(2, 64, 96, 0.5, generator=gen)
    seen = []
    hooks = [p.register_forward_pre_hook(lambda m, args: seen.append(args[0])) for p in model.densify_projs]
    with torch.no_grad():
        feats = model.encode(images, active)
        model.densify(feats, active, (64, 96))
    for hook in hooks:
        hook.remove()
    assert len(seen) == 4
    for i, (x, dense) in enumerate(zip(reversed(feats), seen, strict=True)):
        stride = 32 // 2**i
        shape = (2, x.F.shape[1], 64 // stride, 96 // stride)
        assert dense.shape == shape
        visible = upsample_mask(active, shape[2], shape[3])[:, 0]  # [B, h, w]
        per_site = dense.permute(0, 2, 3, 1)  # [B, h, w, C]
        token = model.mask_tokens[i].reshape(-1)
        assert bool(token.abs().min() > 0.1)
        assert torch.equal(per_site[~visible], token.expand(int((~visible).sum()), -1))
        with torch.no_grad():
            normed = densify(model.densify_norms[i](x), shape).permute(0, 2, 3, 1)
        assert torch.equal(per_site[visible], normed[visible])


@pytest.mark.parametrize("arch", ["resnet18", "convnextv2_atto", "convnext_tiny"])
def test_gradients_reach_every_parameter(gen, arch: str) -> None:
    # resnets zero-init each block's last BN, which blocks the branch's gradient at step 0: not here
    model = small_spark(arch, encoder_kw={"zero_init_last": False} if arch.startswith("resnet") else None)
    images = torch.randn(2, 3, 64, 64, generator=gen)
    model(images).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    dead = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]
    assert not dead


@pytest.mark.parametrize("arch", ["resnet18", "convnextv2_atto"])
def test_a_few_steps_lower_the_loss(gen, arch: str) -> None:
    torch.manual_seed(0)
    model = small_spark(arch)
    # smooth images: masked patches are predictable from their neighbours
    coarse = torch.randn(4, 3, 4, 4, generator=gen)
    images = torch.nn.functional.interpolate(coarse, size=(64, 64), mode="bilinear", align_corners=False)
    active = spark_me.random_mask(4, 64, 64, 0.5, generator=gen)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(12):
        loss = model(images, active)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.97 * losses[0], losses
    assert sum(losses[-3:]) < sum(losses[:3]), losses


def test_reconstruction_pictures(gen) -> None:
    model = small_spark().eval()
    images = torch.randn(2, 3, 64, 96, generator=gen)
    active = spark_me.random_mask(2, 64, 96, 0.6, generator=gen)
    out = model.reconstruct(images, active)
    visible = upsample_mask(active, 64, 96)
    assert torch.equal(out["visible"], visible)
    assert torch.equal(out["masked"], images * visible)
    assert torch.equal(out["merged"] * visible, images * visible)
    assert torch.equal(out["merged"] * ~visible, out["prediction"] * ~visible)
    # prediction carries each patch's true mean/std back: its per-patch mean equals the input's
    assert torch.allclose(patchify(out["prediction"]).mean(-1), patchify(images).mean(-1), atol=1e-4)


def test_random_mask_when_none_given(gen) -> None:
    model = small_spark(mask_ratio=0.75)
    images = torch.randn(3, 3, 64, 128, generator=gen)
    out = model.forward_all(images)
    assert out.active.shape == (3, 2, 4)
    assert out.active.flatten(1).sum(1).tolist() == [2, 2, 2]
    assert out.pred.shape == images.shape


@pytest.mark.parametrize("dataflow", ["rules", "me"])
def test_autocast_runs_the_encoder_in_bf16_except_on_me(gen, device: str, dataflow: str) -> None:
    """The AMP path: the encoder's kernels in bf16 (ME's own function, which has float32 kernels
    only, in float32), the dense parts in bf16; the loss stays close to float32's."""
    model = small_spark("resnet18").to(device)
    model.encoder.set_dataflow(dataflow)
    images = torch.randn(2, 3, 64, 64, generator=gen).to(device)
    active = spark_me.random_mask(2, 64, 64, 0.5, generator=gen).to(device)
    with torch.no_grad():
        reference = model(images, active)
    with torch.autocast(device, dtype=torch.bfloat16):
        feats = model.encode(images, active)
        loss = model(images, active)
    expected = torch.float32 if dataflow == "me" else torch.bfloat16
    assert all(f.F.dtype == expected for f in feats)
    assert torch.isfinite(loss) and abs(loss.item() - reference.item()) <= 0.05 * reference.item()
    loss.backward()
    assert model.encoder.conv1.weight.grad is not None
    assert model.encoder.conv1.weight.grad.dtype == torch.float32


def test_bad_input_is_refused(gen) -> None:
    model = small_spark()
    with pytest.raises(ValueError, match="multiple of 32"):
        model(torch.randn(1, 3, 70, 64))
    with pytest.raises(ValueError, match="mask shape"):
        model(torch.randn(1, 3, 64, 64), torch.ones(1, 3, 3, dtype=torch.bool))


@pytest.mark.parametrize("arch", ["resnet18", "convnextv2_atto"])
def test_short_bf16_training_tracks_float32(gen, arch: str) -> None:
    """Eight Adam steps on one batch: under bf16 autocast (sparse encoder included) the loss stays
    finite, falls, and stays within 5 % of the float32 run's at every step."""
    images = torch.randn(2, 3, 64, 96, generator=gen)
    active = spark_me.random_mask(2, 64, 96, 0.5, generator=gen)
    losses = {}
    for amp in (False, True):
        torch.manual_seed(0)
        model = small_spark(arch)
        model.encoder.set_dataflow("rules")
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        losses[amp] = []
        for _ in range(8):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss = model(images, active)
            loss.backward()
            opt.step()
            losses[amp].append(loss.item())
    full, half = torch.tensor(losses[False]), torch.tensor(losses[True])
    assert torch.isfinite(half).all() and half[-1] < half[0]
    assert ((half - full).abs() / full).max() <= 0.05, (losses[False], losses[True])
