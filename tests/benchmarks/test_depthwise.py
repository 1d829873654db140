"""The depthwise benchmark finds every depthwise conv of a timm model and times every variant at a
tiny size, writing well-formed JSON (no timing asserted)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.depthwise import depthwise_layers, main


def test_finds_convnext_and_efficientnet_depthwise_layers() -> None:
    convnext = {
        (d["kernel"], d["stride"], d["channels"], d["in_stride"]): d["count"]
        for d in depthwise_layers("convnext_tiny", 64)
    }
    assert convnext == {(7, 1, 96, 4): 3, (7, 1, 192, 8): 3, (7, 1, 384, 16): 9, (7, 1, 768, 32): 3}
    efficientnet = depthwise_layers("efficientnet_b0", 64)
    assert sum(d["count"] for d in efficientnet) == 16  # one per inverted-residual block
    assert {(d["kernel"], d["stride"]) for d in efficientnet} == {(3, 1), (3, 2), (5, 1), (5, 2)}


def test_tiny_run_writes_every_variant(tmp_path: Path) -> None:
    out = tmp_path / "dw.json"
    args = [
        "--archs",
        "convnext_tiny",
        "--size",
        "64",
        "--batch_size",
        "1",
        "--repeats",
        "1",
        "--clock",
        "cpu",
    ]
    assert main([*args, "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["env"]["model"] and "flags" in data["env"]
    assert len(data["rows"]) == 4
    for row in data["rows"]:
        assert {"block", "block-aten", "dense", "dense-aten", "k fwd", "k grad-w"} <= set(row["ms"])
        assert "fused" in row["ms"]  # the C++ kernels, or their plain torch definition without a compiler
