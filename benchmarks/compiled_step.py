"""Whole pretraining steps, eager vs `--compile` (SparK.dense_stages through torch.compile),
interleaved in one process on one model.

    python -m benchmarks.compiled_step --configs resnet18:96:256 resnet50:224:768 --batch 4

A configuration is arch:size:decoder_width. One model serves both variants (the compiled function
is switched on and off between steps), so weights, dataflow choices and optimiser are shared and
only the dense stages differ. Each repeat draws a new SparK mask (new visible cells; SparK keeps
the same number per image, so N is constant here: tests/models/test_spark_compiled.py varies it),
runs the eager step then the compiled one on it, and the median of each is reported; the compile
time (first compiled step) and the graphs compiled while timing are recorded, with the CPU and the
load average before and after (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
from pathlib import Path

from benchmarks.encoder import seconds
from benchmarks.machine import cpu, cpu_line

log = logging.getLogger("spark_me.bench.compiled_step")


def load() -> str:
    """The 1, 5 and 15 minute load averages, as `uptime` shows them."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def compare(arch: str, size: int, width: int, batch: int, ratio: float, repeats: int, backend: str) -> dict:
    """Median whole-step seconds (zero_grad, forward, backward, LAMB), eager and compiled."""
    import torch
    from timm.optim import Lamb
    from torch._dynamo.utils import counters

    import spark_me
    from spark_me.engine.compiled import compile_seconds

    torch._dynamo.reset()  # compile this configuration anew (not from an earlier one's graphs)
    torch.manual_seed(0)
    model = spark_me.SparK(spark_me.create_encoder(arch), decoder_width=width, mask_ratio=ratio)
    optimizer = Lamb(model.parameters(), lr=1e-4)
    images = torch.randn(batch, 3, size, size)
    model.compile_dense_stages(backend=backend)
    compiled = model._compiled_stages  # switched off for the eager variant (same model)

    def step(active, use_compiled: bool):
        model._compiled_stages = compiled if use_compiled else None
        optimizer.zero_grad(set_to_none=True)
        model(images, active).backward()
        optimizer.step()

    def mask():
        return spark_me.random_mask(batch, size, size, ratio)

    first = mask()
    step(first, False)  # warm-up: the encoder tunes its dataflows
    before = compile_seconds()
    first_compiled = seconds(lambda: step(first, True), torch.device("cpu"))
    compile_s = compile_seconds() - before
    graphs = counters["stats"]["unique_graphs"]
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    sites = []
    for _ in range(repeats):
        active = mask()
        sites.append(int(active.sum()))
        times["eager"].append(seconds(lambda a=active: step(a, False), torch.device("cpu")))
        times["compiled"].append(seconds(lambda a=active: step(a, True), torch.device("cpu")))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "arch": arch, "size": size, "decoder_width": width, "batch": batch, "mask_ratio": ratio,
        "backend": backend, "compile_seconds": compile_s, "first_compiled_step": first_compiled,
        "new_graphs_while_timed": counters["stats"]["unique_graphs"] - graphs,
        "visible_cells": sites, "step_seconds": med, "all_step_seconds": times,
        "compiled_speedup": med["eager"] / med["compiled"],
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["resnet18:96:256", "resnet50:224:768"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--ratio", type=float, default=0.6)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--backend", default="inductor")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    import torch

    torch.set_num_threads(args.threads)
    machine = cpu()
    log.info("%s", cpu_line(machine))
    rows = []
    for config in args.configs:
        arch, size, width = config.split(":")
        at_start = load()
        row = compare(arch, int(size), int(width), args.batch, args.ratio, args.repeats, args.backend)
        row["load_before_after"] = [at_start, load()]
        rows.append(row)
        s = row["step_seconds"]
        log.info(
            "%s %s px, decoder %s, batch %d: eager %.3f s  compiled %.3f s  x%.2f | compile %.1f s, "
            "%d new graph(s) over %d masks | load %s -> %s",
            arch, size, width, args.batch, s["eager"], s["compiled"], row["compiled_speedup"],
            row["compile_seconds"], row["new_graphs_while_timed"], args.repeats, *row["load_before_after"],
        )  # fmt: skip
        if args.out:  # after every configuration: a long sweep cut short keeps what it measured
            args.out.write_text(json.dumps({"cpu": machine, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
