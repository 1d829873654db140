"""The 3x3-conv dataflow benchmark times every dataflow at each stride and writes well-formed JSON
(no timing asserted)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.conv_flows import FLOWS, LAYERS, main


def test_tiny_run_times_every_dataflow_at_every_stride(tmp_path: Path) -> None:
    out = tmp_path / "conv.json"
    args = ["--size", "64", "--batch_size", "1", "--ratio", "0", "--repeats", "1", "--out", str(out)]
    assert main(args) == 0
    data = json.loads(out.read_text())
    assert data["cpu"]["model"] and "flags" in data["cpu"]
    assert [(r["stride"], r["channels"]) for r in data["rows"]] == list(LAYERS)
    for row in data["rows"]:
        assert row["sites"] == (64 // row["stride"]) ** 2  # nothing masked
        assert set(row["ms"]) == set(FLOWS) and all(ms > 0 for ms in row["ms"].values())
