"""Detection tests need Detectron2 (the set-up step installs it). Under the README's test command
(SPARK_ME_REQUIRE_DETECTRON2=1) a missing Detectron2 is an error, never a silent skip."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if os.environ.get("SPARK_ME_REQUIRE_DETECTRON2") == "1":
    import detectron2  # noqa: F401
else:
    pytest.importorskip("detectron2", reason="Detectron2 not installed: python3 -m spark_me.bootstrap setup")

import converters  # noqa: E402
import spark_me  # noqa: E402


@pytest.fixture(scope="session")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Exports of randomly initialised sparse encoders, as `spark-me export` writes them.

    BN statistics and affine parameters are randomised so that a mis-mapped key changes features."""
    out = tmp_path_factory.mktemp("exports")
    torch.manual_seed(0)
    paths = {}
    for arch in ("resnet50", "convnext_atto"):
        encoder = spark_me.create_encoder(arch)
        state = {
            k: (torch.rand_like(v) * 0.5 + 0.75 if ("running_var" in k or k.endswith("bn1.weight")) else v)
            if v.is_floating_point() else v
            for k, v in encoder.state_dict().items()
        }  # fmt: skip
        encoder.load_state_dict(state)
        timm_state = converters.to_timm(encoder.state_dict(), arch)
        paths[f"{arch}.safetensors"] = converters.save_state(timm_state, out / f"{arch}.safetensors")
        paths[f"{arch}.encoder"] = converters.save_state(encoder.state_dict(), out / f"{arch}_encoder.pth")
        if arch.startswith("resnet"):
            paths[f"{arch}.pkl"] = converters.save_state(
                converters.to_detectron2(timm_state), out / f"{arch}.pkl"
            )
    return paths
