"""timm ResNet -> Detectron2 names, checked against the backbone Detectron2 itself builds."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import timm
import torch

import converters
from converters.detectron2_format import timm_to_detectron2_name

from .._fixtures import randomize, require_detectron2


def detectron2_r50_shapes() -> dict[str, tuple[int, ...]]:
    """Detectron2's own Mask R-CNN R50-FPN bottom-up tensors (no stored copy to fall back on: a
    missing Detectron2 is an error under the test command, as in tests/detection)."""
    require_detectron2()
    from detectron2 import model_zoo
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    prefix = "backbone.bottom_up."
    return {
        k[len(prefix) :]: tuple(v.shape)
        for k, v in build_model(cfg).state_dict().items()
        if k.startswith(prefix)
    }


def test_resnet50_matches_detectron2_backbone(gen) -> None:
    timm_state = timm.create_model("resnet50").state_dict()
    exported = converters.to_detectron2(timm_state)
    assert exported["__author__"] == "spark-me" and exported["matching_heuristics"] is True
    expected = detectron2_r50_shapes()
    assert len(expected) == 265
    got = {k: tuple(v.shape) for k, v in exported["model"].items()}
    assert got == expected  # every backbone tensor, with Detectron2's shapes; fc and counters dropped


def test_round_trip_and_pickle(tmp_path: Path, gen) -> None:
    """Bit-exact both ways; the norms are randomised so that two swapped tensors cannot look equal."""
    dense = timm.create_model("resnet18")
    randomize(dense, gen)
    timm_state = dense.state_dict()
    path = converters.save_state(converters.to_detectron2(timm_state), tmp_path / "r18.pkl")
    with open(path, "rb") as fh:
        loaded = pickle.load(fh)
    back = converters.from_detectron2(loaded)
    for key, value in timm_state.items():
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            continue
        assert torch.equal(back[key], value), key
    # and what comes back loads into the sparse encoder
    assert converters.from_timm(back, "resnet18", allow_missing=[k for k in timm_state if "num_batches" in k])


@pytest.mark.parametrize(
    ("timm_key", "d2_key"),
    [
        ("conv1.weight", "stem.conv1.weight"),
        ("bn1.running_var", "stem.conv1.norm.running_var"),
        ("layer1.0.bn3.bias", "res2.0.conv3.norm.bias"),
        ("layer4.2.conv2.weight", "res5.2.conv2.weight"),
        ("layer2.0.downsample.0.weight", "res3.0.shortcut.weight"),
        ("layer3.0.downsample.1.running_mean", "res4.0.shortcut.norm.running_mean"),
        ("fc.weight", None),
        ("layer1.0.bn1.num_batches_tracked", None),
    ],
)
def test_names(timm_key: str, d2_key: str | None) -> None:
    assert timm_to_detectron2_name(timm_key) == d2_key


def test_convnext_is_refused() -> None:
    with pytest.raises(ValueError, match="ResNets only"):
        converters.to_detectron2(timm.create_model("convnext_atto").state_dict())
