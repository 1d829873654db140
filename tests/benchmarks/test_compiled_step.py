"""benchmarks.compiled_step runs end to end at a tiny size (aot_eager: no code generation) and
records what it measured; no timing is asserted."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from benchmarks.compiled_step import main


def test_tiny_run_writes_both_variants_and_no_recompile(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    args = ["--configs", "resnet18:64:32", "--batch", "2", "--ratio", "0.5", "--repeats", "2"]
    threads = torch.get_num_threads()
    try:
        assert main([*args, "--threads", "1", "--backend", "aot_eager", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)  # main sets the benchmark's thread count
    result = json.loads(out.read_text())
    assert result["cpu"]["threads"] == 1 and result["cpu"]["model"]
    (row,) = result["rows"]
    assert (row["arch"], row["size"], row["decoder_width"], row["backend"]) == (
        "resnet18",
        64,
        32,
        "aot_eager",
    )
    assert all(len(t) == 2 and min(t) > 0 for t in row["all_step_seconds"].values())
    assert row["compile_seconds"] > 0 and row["new_graphs_while_timed"] == 0
    assert row["compiled_speedup"] == row["step_seconds"]["eager"] / row["step_seconds"]["compiled"]
    assert len(row["load_before_after"]) == 2
