"""A spark-me export loads into Detectron2 completely and gives the sparse encoder's features."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from detectron2.modeling import build_model

import converters
import spark_me
from detection.config import load_config
from detection.weights import load_pretrained_backbone

from .._fixtures import perturbations

CONFIGS = {
    "resnet50": ("mask_rcnn_R_50_FPN_1x.yaml",),
    "convnext_atto": ("mask_rcnn_convnext_T_FPN_1x.yaml", "MODEL.TIMM.ARCH", "convnext_atto"),
}


def _model(config: str, *opts: str):
    return build_model(load_config(config, ["MODEL.DEVICE", "cpu", *opts])).eval()


def _sparse_features(arch: str, encoder_file: Path, images: torch.Tensor) -> list[torch.Tensor]:
    encoder = spark_me.create_encoder(arch).eval()
    encoder.load_state_dict(torch.load(encoder_file, weights_only=True))
    active = torch.ones(images.shape[0], images.shape[2] // 32, images.shape[3] // 32, dtype=torch.bool)
    with torch.no_grad():
        return encoder(images, active)


def _d2_features(model, images: torch.Tensor) -> list[torch.Tensor]:
    bottom_up = model.backbone.bottom_up
    with torch.no_grad():
        if hasattr(bottom_up, "model"):  # the timm ConvNeXt wrapper
            return bottom_up.model.forward_intermediates(images, indices=4, intermediates_only=True)
        feats = bottom_up(images)
    return [feats[k] for k in ("res2", "res3", "res4", "res5")]


def _assert_close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        assert ((g - w).abs().max() / w.abs().max()).item() <= 1e-5


@pytest.mark.parametrize("source", ["resnet50.pkl", "resnet50.safetensors", "resnet50.encoder"])
def test_resnet50_export_loads_every_backbone_key_and_equals_the_sparse_encoder(exports, source) -> None:
    model = _model("mask_rcnn_R_50_FPN_1x.yaml")
    report = load_pretrained_backbone(model, exports[source])
    assert report.loaded == 265  # all of Detectron2's R50 bottom-up tensors (BN counters aside)
    assert not [g for g in report.initialised if g.startswith("backbone.bottom_up")]
    assert "roi_heads.mask_head" in report.initialised and "backbone.fpn_lateral2" in report.initialised
    images = torch.randn(2, 3, 96, 64)  # non-square
    with torch.no_grad():
        feats = model.backbone.bottom_up(images)
    got = [feats[k] for k in ("res2", "res3", "res4", "res5")]
    _assert_close(got, _sparse_features("resnet50", exports["resnet50.encoder"], images))


def test_convnext_export_into_the_timm_backbone_equals_the_sparse_encoder(exports) -> None:
    model = _model("mask_rcnn_convnext_T_FPN_1x.yaml", "MODEL.TIMM.ARCH", "convnext_atto")
    report = load_pretrained_backbone(model, exports["convnext_atto.safetensors"])
    assert report.loaded == len(torch.load(exports["convnext_atto.encoder"], weights_only=True))
    assert report.initialised["backbone.bottom_up.out_norms"] == 8  # the only new backbone tensors
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        got = model.backbone.bottom_up.model.forward_intermediates(images, indices=4, intermediates_only=True)
    _assert_close(got, _sparse_features("convnext_atto", exports["convnext_atto.encoder"], images))
    shapes = model.backbone.bottom_up.output_shape()
    assert [shapes[k].stride for k in ("res2", "res3", "res4", "res5")] == [4, 8, 16, 32]


def test_wrong_architecture_fails_naming_keys(exports, tmp_path: Path) -> None:
    r50 = _model("mask_rcnn_R_50_FPN_1x.yaml")
    before = {k: v.clone() for k, v in r50.state_dict().items()}
    with pytest.raises(ValueError, match="no 'layer1"):
        load_pretrained_backbone(r50, exports["convnext_atto.safetensors"])
    r18 = spark_me.create_encoder("resnet18")
    import converters

    path = converters.save_state(converters.to_timm(r18.state_dict(), "resnet18"), tmp_path / "r18.pth")
    with pytest.raises(ValueError, match=r"missing: .*res2\.0\.conv3\.weight") as err:
        load_pretrained_backbone(r50, path)
    assert "wrong shape" in str(err.value)  # r18's res2 convs exist in r50 with other shapes
    assert all(torch.equal(before[k], v) for k, v in r50.state_dict().items())  # nothing half-loaded


def test_pretraining_checkpoint_is_converted_on_the_fly(exports, tmp_path: Path) -> None:
    encoder_state = torch.load(exports["resnet50.encoder"], weights_only=True)
    checkpoint = {
        "model": {f"encoder.{k}": v for k, v in encoder_state.items()},
        "config": {"arch": "resnet50"},
    }
    torch.save(checkpoint, tmp_path / "checkpoint-last.pth")
    model = _model("mask_rcnn_R_50_FPN_1x.yaml")
    assert load_pretrained_backbone(model, tmp_path / "checkpoint-last.pth").loaded == 265
    assert torch.equal(model.backbone.bottom_up.stem.conv1.weight, encoder_state["conv1.weight"])


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_the_comparison_fails_for_a_swapped_or_dropped_tensor(exports, tmp_path: Path, arch: str) -> None:
    """Self-test of the fixture: with its randomised norms and layer scales, an export with two
    block tensors swapped, or one left at its initial value, no longer gives the sparse features."""
    encoder_file = exports[f"{arch}.encoder"]
    state = torch.load(encoder_file, weights_only=True)
    fresh = spark_me.create_encoder(arch).state_dict()
    images = torch.randn(2, 3, 64, 96)
    want = _sparse_features(arch, encoder_file, images)
    model = _model(*CONFIGS[arch])
    load_pretrained_backbone(model, exports[f"{arch}.safetensors"])
    _assert_close(_d2_features(model, images), want)  # the faithful export passes
    for i, (what, wrong) in enumerate(perturbations(arch, state, fresh)):
        path = converters.save_state(converters.to_timm(wrong, arch), tmp_path / f"wrong{i}.safetensors")
        load_pretrained_backbone(model, path)
        with pytest.raises(AssertionError):
            _assert_close(_d2_features(model, images), want)
            pytest.fail(f"{what}: not detected")
