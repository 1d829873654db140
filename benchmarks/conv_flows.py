"""One dense 3x3 conv at each of ResNet-50's strides 8-32, every dataflow, forward + backward.

    python -m benchmarks.conv_flows --out benchmarks/results/cpu-sweep-bf16/conv3x3-dataflows.json

Answers "would a gather-GEMM that does not materialise the `[N, 9 * C]` columns pay at strides
16-32?" with the kernel that already works that way: MinkowskiEngine's own (`me`: for each of the
9 offsets, gather the sites that have that neighbour, one small GEMM, scatter-add), beside `gemm`
(columns materialised, one large GEMM), `block` and `dense`. Each layer's input is sparsified at
its stride (random stride-32 mask), the variants run interleaved in one process, median of
`--repeats` after a warm-up; the CPU is recorded.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

log = logging.getLogger("spark_me.bench.conv_flows")

FLOWS = ("block", "dense", "gemm", "me")
LAYERS = ((8, 128), (16, 256), (32, 512))  # (input stride, channels) of ResNet-50's 3x3 convs


def bench_layer(stride: int, channels: int, batch: int, size: int, ratio: float, repeats: int) -> dict:
    """Median ms of forward + backward of a 3x3 conv (channels -> channels) per dataflow."""
    import torch

    from spark_me.sparse import dataflows
    from spark_me.sparse.ops import SparseOp
    from spark_me.sparse.tensor import sparsify

    gen = torch.Generator().manual_seed(0)
    grid, side = size // 32, size // stride
    active = torch.rand(batch, grid, grid, generator=gen) >= ratio
    x = sparsify(torch.randn(batch, channels, side, side, generator=gen), active, stride=stride)
    op = SparseOp("conv", 3, 1, channels, channels)
    weight = torch.randn(channels, channels, 3, 3, generator=gen, requires_grad=True)
    feats = x.F.detach().requires_grad_(True)
    probe = type(x)(feats, coordinate_map_key=x.coordinate_map_key, coordinate_manager=x.coordinate_manager)

    def run(name: str) -> None:
        out, _ = dataflows.run(name, op, probe, weight, None)
        out.backward(torch.ones_like(out))

    times: dict[str, list[float]] = {name: [] for name in FLOWS}
    for name in FLOWS:  # warm-up
        run(name)
    for _ in range(repeats):
        for name in FLOWS:
            start = time.perf_counter()
            run(name)
            times[name].append(time.perf_counter() - start)
    ms = {name: round(statistics.median(t) * 1e3, 3) for name, t in times.items()}
    return {"stride": stride, "channels": channels, "sites": len(feats), "ms": ms}


def main(argv: list[str] | None = None) -> int:
    from benchmarks.machine import add_shape_args, announce, write_result

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(p, repeats=7)
    args = p.parse_args(argv)

    announce(log)
    rows = []
    for stride, channels in LAYERS:
        row = bench_layer(stride, channels, args.batch_size, args.size, args.ratio, args.repeats)
        rows.append(row)
        log.info(
            "3x3 conv %d -> %d at stride %d (%d sites): %s", channels, channels, stride, row["sites"],
            "  ".join(f"{name} {ms:.2f} ms" for name, ms in row["ms"].items()),
        )  # fmt: skip
    if args.out:
        write_result(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
