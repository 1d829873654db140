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


TINY = ["--size", "64", "--batch_size", "1", "--repeats", "1", "--clock", "cpu"]


def test_tiny_runs_of_the_other_modes(tmp_path: Path) -> None:
    """What the README's re-measuring commands run: whole encoders before / after (`--encoder`),
    the layers under bf16 autocast, and torch.compile's gather-sum (`--inductor`)."""
    out = tmp_path / "encoder.json"
    assert main(["--encoder", "--archs", "efficientnet_b0", *TINY, "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["arch"] == "efficientnet_b0" and all(s > 0 for s in row["seconds"].values())
    assert row["depthwise_dataflows_after"]  # the dataflow table of the encoder after
    out = tmp_path / "bf16.json"
    assert main(["--archs", "convnext_tiny", "--amp", "bf16", *TINY, "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 4 and all("fused" in r["ms"] and "k fwd" not in r["ms"] for r in rows)
    out = tmp_path / "inductor.json"
    assert main(["--archs", "convnext_tiny", "--inductor", *TINY, "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert all("fwd inductor" in r["ms"] and r["inductor_compile_s"] >= 0 for r in rows)
