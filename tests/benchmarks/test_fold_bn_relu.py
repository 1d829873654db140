"""The fold benchmark runs both encoders on the same inputs and writes well-formed JSON; the folded
one saves fewer activations (a count, not a timing)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.fold_bn_relu import main


def test_tiny_run_folded_saves_less(tmp_path: Path) -> None:
    out = tmp_path / "fold.json"
    args = ["--archs", "resnet18", "--size", "64", "--batch_size", "2", "--repeats", "1", "--out", str(out)]
    assert main(args) == 0
    data = json.loads(out.read_text())
    assert data["cpu"]["model"] and "flags" in data["cpu"]
    (row,) = data["rows"]
    saved = row["saved_mib"]
    assert 0 < saved["folded"] < saved["layer_by_layer"] < saved["masked_dense"]
    assert all(s > 0 for s in row["seconds"].values())
