"""Every registered encoder is the sparse twin of the timm model of the same name."""

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


def test_all_families_registered() -> None:
    assert set(EXPECTED) <= set(spark_me.list_encoders())
    assert spark_me.list_encoders("resnet*") == sorted(n for n in EXPECTED if n.startswith("resnet"))


@pytest.mark.parametrize("arch", spark_me.list_encoders())
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
