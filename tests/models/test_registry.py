"""Every listed encoder is the sparse twin of the timm model of the same name."""

from __future__ import annotations

import pytest
import timm
import torch

import spark_me

EXPECTED = (
    [f"resnet{d}" for d in (18, 34, 50, 101, 152, 200)]
    + [f"convnext_{s}" for s in ("atto", "femto", "pico", "nano", "tiny", "small", "base", "large")]
    + [f"convnextv2_{s}" for s in ("atto", "femto", "pico", "nano", "tiny", "small", "base", "large", "huge")]
)


GENERIC = (
    "resnet50d", "resnext50_32x4d", "seresnext50_32x4d", "regnetx_016", "regnety_016", "efficientnet_b0",
    "efficientnet_lite0", "mobilenetv2_100", "mobilenetv3_large_100", "densenet121", "cspdarknet53",
    "dla34", "ghostnet_100", "repvgg_a2",
)  # fmt: skip


def test_all_families_listed() -> None:
    assert set(EXPECTED) | set(GENERIC) <= set(spark_me.list_encoders())
    assert spark_me.list_encoders("resnet*") == sorted(
        n for n in (*EXPECTED, *GENERIC) if n.startswith("resnet")
    )


@pytest.mark.parametrize("arch", [a for a in spark_me.list_encoders() if a not in GENERIC])
def test_state_dict_is_timms(arch: str) -> None:
    """Same keys, same shapes (timm's classifier `head.norm` aside): export is a plain copy."""
    with torch.device("meta"):
        sparse = spark_me.create_encoder(arch)
        dense = timm.create_model(arch, num_classes=0)
    ours = {k: v.shape for k, v in sparse.state_dict().items()}
    theirs = {k: v.shape for k, v in dense.state_dict().items() if not k.startswith("head.")}
    assert ours == theirs
    assert sparse.channels == tuple(info["num_chs"] for info in dense.feature_info[-4:])


def test_unknown_architecture_names_alternatives() -> None:
    with pytest.raises(ValueError, match="unknown architecture 'resnet42'.*resnet50"):
        spark_me.create_encoder("resnet42")


@pytest.mark.parametrize("arch", GENERIC)
def test_generic_state_dict_is_timms_up_to_the_last_stage(arch: str) -> None:
    """The generic encoder is timm's own model: its keys, less the modules after the last stage
    (nothing else), and the stage widths of feature_info."""
    sparse = spark_me.create_encoder(arch, dataflow="rules")
    dense = timm.create_model(arch, num_classes=0)
    ours = {k: v.shape for k, v in sparse.state_dict().items()}
    theirs = {k: v.shape for k, v in dense.state_dict().items()}
    after_last = {k for k in theirs if any(k.startswith(d + ".") for d in sparse.dropped)}
    assert ours == {k: v for k, v in theirs.items() if k not in after_last}
    widths = {info["reduction"]: info["num_chs"] for info in dense.feature_info}
    assert sparse.channels == tuple(widths[s] for s in (4, 8, 16, 32))
