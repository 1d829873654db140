"""Detection tests need Detectron2 (the set-up step installs it). Under the README's test command
(SPARK_ME_REQUIRE_DETECTRON2=1) a missing Detectron2 is an error, never a silent skip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .._fixtures import randomize, require_detectron2

require_detectron2()

import converters  # noqa: E402
import spark_me  # noqa: E402


@pytest.fixture(scope="session")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Exports of randomly initialised sparse encoders, as `spark-me export` writes them.

    Every norm weight/bias/statistic and layer scale is randomised (tests/_fixtures.py), so that a
    mis-mapped or missing tensor anywhere in the blocks changes the features."""
    out = tmp_path_factory.mktemp("exports")
    gen = torch.Generator().manual_seed(0)
    paths = {}
    for arch in ("resnet50", "convnext_atto"):
        encoder = spark_me.create_encoder(arch)
        randomize(encoder, gen)
        timm_state = converters.to_timm(encoder.state_dict(), arch)
        paths[f"{arch}.safetensors"] = converters.save_state(timm_state, out / f"{arch}.safetensors")
        paths[f"{arch}.encoder"] = converters.save_state(encoder.state_dict(), out / f"{arch}_encoder.pth")
        if arch.startswith("resnet"):
            paths[f"{arch}.pkl"] = converters.save_state(
                converters.to_detectron2(timm_state), out / f"{arch}.pkl"
            )
    return paths
