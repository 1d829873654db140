"""Export to timm is exact; import from timm round-trips bit for bit; mismatches are named."""

from __future__ import annotations

import pytest
import timm
import torch

import converters
import spark_me
from spark_me.sparse.layout import conv_weight_to_me_depthwise, conv_weight_to_me_kernel

from ..models.conftest import TINY, randomize

# small widths/depths where timm allows, plus one real-size model per family
CASES = [(arch, TINY[arch]) for arch in sorted(TINY)] + [
    ("resnet50", {}),
    ("convnext_atto", {}),
    ("convnextv2_atto", {}),
]


def features(model, images, arch):
    indices = [1, 2, 3, 4] if arch.startswith("resnet") else [0, 1, 2, 3]
    return model.forward_intermediates(images, indices=indices, intermediates_only=True)


@pytest.mark.parametrize(("arch", "kw"), CASES, ids=[f"{a}-{'tiny' if k else 'full'}" for a, k in CASES])
def test_export_gives_timm_the_same_features(gen, arch: str, kw: dict) -> None:
    sparse = spark_me.create_encoder(arch, **kw).eval()
    randomize(sparse, gen)
    state = converters.to_timm(sparse.state_dict(), arch, **kw)
    dense = timm.create_model(arch, **kw).eval()
    result = dense.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    assert all(k.startswith(("fc.", "head.")) for k in result.missing_keys), result.missing_keys
    images = torch.randn(2, 3, 96, 64, generator=gen)
    with torch.no_grad():
        got = sparse(images, torch.ones(2, 3, 2, dtype=torch.bool))
        expected = features(dense, images, arch)
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape
        assert float((g - e).abs().max() / e.abs().max()) <= 1e-5


@pytest.mark.parametrize(("arch", "kw"), CASES[:6])
def test_timm_round_trip_is_bit_identical(gen, arch: str, kw: dict) -> None:
    dense = timm.create_model(arch, **kw)
    randomize(dense, gen)
    original = {k: v for k, v in dense.state_dict().items() if not k.startswith(("fc.", "head."))}
    sparse_state = converters.from_timm(dense.state_dict(), arch, **kw)
    encoder = spark_me.create_encoder(arch, **kw)
    encoder.load_state_dict(sparse_state, strict=True)
    back = converters.to_timm(encoder.state_dict(), arch, **kw)
    assert back.keys() == original.keys()
    for k in original:
        assert torch.equal(back[k], original[k]), k


def test_full_spark_checkpoint_is_accepted(gen) -> None:
    """A pretraining checkpoint ({'model': SparK state, ...}, DDP prefixes) exports its encoder only."""
    model = spark_me.SparK(spark_me.create_encoder("resnet18"), decoder_width=64)
    ddp_state = {f"module.{k}": v for k, v in model.state_dict().items()}
    checkpoint = {"model": ddp_state, "epoch": 3, "config": {"arch": "resnet18"}}
    state = converters.to_timm(checkpoint, "resnet18")
    assert state.keys() == model.encoder.state_dict().keys()
    assert torch.equal(state["layer4.1.conv2.weight"], model.encoder.layer4[1].conv2.weight)


def test_minkowski_layout_is_relaid_out(gen) -> None:
    """State dicts in ME's layout (kernels [k*k, in, out], depthwise [k*k, C], biases [1, C])."""
    arch, kw = "convnextv2_atto", TINY["convnextv2_atto"]
    sparse = spark_me.create_encoder(arch, **kw)
    randomize(sparse, gen)
    me_state = {}
    for k, v in sparse.state_dict().items():
        if k.endswith("conv_dw.weight"):
            me_state[k] = conv_weight_to_me_depthwise(v)
        elif v.dim() == 4 and v.shape[-1] > 1:
            me_state[k] = conv_weight_to_me_kernel(v)
        elif k.endswith("grn.weight"):
            me_state[k] = v.reshape(1, 1, 1, -1)
        elif k.endswith("bias") and v.dim() == 1:
            me_state[k] = v.reshape(1, -1)
        else:
            me_state[k] = v
    exported = converters.to_timm(me_state, arch, **kw)
    for k, v in sparse.state_dict().items():
        assert torch.equal(exported[k], v), k


def test_wrong_architecture_names_the_keys() -> None:
    state = spark_me.create_encoder("resnet18").state_dict()
    with pytest.raises(
        converters.KeyMismatchError, match=r"(?s)'resnet50'.*missing.*layer1\.0\.conv3\.weight"
    ):
        converters.to_timm(state, "resnet50")
    with pytest.raises(
        converters.KeyMismatchError,
        match=r"(?s)unexpected.*stages\.0\.blocks\.0\.conv_dw\.weight.*look like convnext_atto",
    ):
        converters.from_timm(spark_me.create_encoder("convnext_atto").state_dict(), "resnet18")
    shapes = spark_me.create_encoder("convnext_atto", dims=(8, 16, 24, 32)).state_dict()
    with pytest.raises(converters.KeyMismatchError, match="does not fit"):
        converters.to_timm(shapes, "convnext_atto")


def test_allow_missing_must_name_the_keys() -> None:
    state = spark_me.create_encoder("resnet18").state_dict()
    del state["bn1.num_batches_tracked"]
    with pytest.raises(converters.KeyMismatchError, match="bn1.num_batches_tracked"):
        converters.to_timm(state, "resnet18")
    out = converters.to_timm(state, "resnet18", allow_missing=["bn1.num_batches_tracked"])
    assert "bn1.num_batches_tracked" not in out
