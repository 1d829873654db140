"""`--weights`: a pretraining checkpoint, a timm export and timm weights all load the backbone exactly;
the classifier is taken only when it fits; a file of another architecture is refused in one line."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import timm
import torch

from spark_me.engine.transfer import create_model
from spark_me.engine.transfer_weights import read_weights


@pytest.fixture(scope="module")
def donor() -> dict[str, torch.Tensor]:
    """A ResNet-18 with 1000 classes whose every tensor differs from a fresh initialisation."""
    torch.manual_seed(1)
    model = timm.create_model("resnet18")
    with torch.no_grad():
        for value in model.state_dict().values():
            if value.is_floating_point():
                value.add_(torch.rand_like(value))
    return model.state_dict()


def backbone(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def build(path: Path, num_classes: int = 4) -> tuple[dict, list[str]]:
    model, loaded = create_model("resnet18", num_classes, {}, read_weights(path, "resnet18"))
    return model.state_dict(), loaded


def assert_backbone_equal(got: dict, want: dict) -> None:
    for key, value in backbone(want).items():
        assert torch.equal(got[key], value), key


def test_pretraining_checkpoint(tmp_path: Path, donor, caplog) -> None:
    """encoder.* keys of the SparK model (decoder ignored), as engine/checkpoint.py writes them."""
    model = {f"encoder.{k}": v for k, v in backbone(donor).items()} | {"decoder.proj.weight": torch.ones(3)}
    state = {
        "model": model,
        "optimizer": {},
        "epoch": 7,
        "step": 70,
        "config": {"arch": "resnet18", "mask_ratio": 0.6},
    }
    torch.save(state, tmp_path / "checkpoint-last.pth")
    caplog.set_level(logging.INFO)
    got, loaded = build(tmp_path / "checkpoint-last.pth")
    assert_backbone_equal(got, donor)
    assert "fc.weight" not in loaded and got["fc.weight"].shape == (4, 512)
    assert (
        "pretraining checkpoint, epoch 8" in caplog.text
        and "left at initialisation: fc.weight, fc.bias" in caplog.text
    )


def test_timm_export_and_timm_weights(tmp_path: Path, donor) -> None:
    torch.save(backbone(donor), tmp_path / "timm-last.pth")  # pretraining's export: no classifier
    got, _ = build(tmp_path / "timm-last.pth")
    assert_backbone_equal(got, donor)
    torch.save(donor, tmp_path / "imagenet.pth")  # 1000-class timm weights: the classifier does not fit
    got, loaded = build(tmp_path / "imagenet.pth")
    assert_backbone_equal(got, donor)
    assert "fc.weight" not in loaded and not torch.equal(got["fc.bias"][:4], donor["fc.bias"][:4])
    got, loaded = build(tmp_path / "imagenet.pth", num_classes=1000)  # same classes: the classifier too
    assert torch.equal(got["fc.weight"], donor["fc.weight"]) and "fc.bias" in loaded


@pytest.mark.parametrize("arch", ["resnet34", "resnet26", "convnext_atto"])
def test_another_architecture_is_refused_in_one_line(tmp_path: Path, arch: str) -> None:
    torch.save(timm.create_model(arch).state_dict(), tmp_path / "w.pth")
    with pytest.raises(ValueError, match="does not fit --arch resnet18") as err:
        build(tmp_path / "w.pth")
    assert "\n" not in str(err.value)


def test_a_missing_backbone_tensor_is_refused(tmp_path: Path, donor) -> None:
    state = backbone(donor)
    del state["layer3.1.bn2.weight"]
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(
        ValueError, match=r"1 of the \d+ backbone tensors missing \(e.g. layer3.1.bn2.weight\)"
    ):
        build(tmp_path / "w.pth")
