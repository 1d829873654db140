"""Where the time of a sparse SparK step goes.

    python -m benchmarks.profile --arch resnet50 --size 224 --batch_size 4 --out benchmarks/results/cpu

Three views, written to profile-<arch>.txt:
1. stages of the forward (record_function labels in SparK: encode, densify, decode, loss), and
   forward + backward of the whole step, from torch.profiler;
2. the top operators (forward and autograd backward nodes, e.g. MinkowskiConvolutionFunctionBackward);
3. the sparse encoder alone (forward + backward) and the dataflow its tuner chose per op;
4. the cost of building coordinate and kernel maps: the same sparse encoder forward on a fresh
   coordinate manager (maps built) vs on the manager of the previous call (maps reused).

With `--traffic` it writes instead traffic-<arch>.md: the layout traffic (calls and bytes of
copy_ / add_ / fill_ / index_add_ / cat / contiguous / to, traced to their source; traffic.py) of
the sparse encoder alone, forward + backward, in float32 and under bf16 autocast. Counts and
bytes, unlike times, do not depend on the machine's load; the dataflows are fixed
(`--dataflow rules` by default) so that the run is deterministic.

    python -m benchmarks.profile --traffic --arch resnet152 --batch_size 2 --out benchmarks/results/traffic
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import spark_me
from benchmarks import machine, traffic
from spark_me.sparse.tensor import sparsify


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--mask_ratio", type=float, default=0.6)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/latest"))
    p.add_argument("--traffic", action="store_true", help="layout traffic of the sparse encoder only")
    p.add_argument("--dataflow", default="rules", help="with --traffic: tuner mode (rules: deterministic)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    if args.traffic:
        return traffic_report(args)
    model = spark_me.SparK(spark_me.create_encoder(args.arch), mask_ratio=args.mask_ratio)
    images = torch.randn(args.batch_size, 3, args.size, args.size)
    active = model.mask(images)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(images, active).backward()

    step()  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        step()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60)
    stages = {e.key: e.cpu_time_total / 1e3 for e in prof.key_averages() if e.key.startswith("spark.")}

    def encoder_step() -> None:  # the sparse encoder alone, forward + backward
        sum(f.F.sum() for f in model.encoder.forward_sparse(sparsify(images, active))).backward()

    with profile(activities=activities) as prof_enc:
        encoder_step()
    encoder_table = prof_enc.key_averages().table(
        sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60
    )
    flows = sorted({(op, flow) for _, op, flow in model.encoder.dataflow_table()})

    encoder = model.encoder.eval()

    def fresh() -> None:  # new coordinate manager: coordinate and kernel maps are built
        with torch.no_grad():
            encoder.forward_sparse(sparsify(images, active))

    x = sparsify(images, active)

    def reused() -> None:  # same manager and coordinates: every map comes from ME's cache
        with torch.no_grad():
            encoder.forward_sparse(x)

    reused()
    t_fresh, t_reused = timed(fresh, args.repeat), timed(reused, args.repeat)
    step_s = timed(step, args.repeat)

    lines = [
        f"# {args.arch} {args.size}px batch {args.batch_size} mask {args.mask_ratio}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        f"full step (forward + backward, no optimiser): {step_s:.3f} s (median of {args.repeat})",
        "forward stages (ms, profiled step): " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(stages.items())),
        f"encoder forward, fresh coordinate manager (maps built): {t_fresh * 1e3:.0f} ms",
        f"encoder forward, maps reused from ME's cache:           {t_reused * 1e3:.0f} ms",
        f"=> coordinate + kernel map building: {max(t_fresh - t_reused, 0) * 1e3:.0f} ms per step "
        f"({max(t_fresh - t_reused, 0) / step_s:.0%} of the step)",
        "",
        table,
        "",
        "sparse encoder alone, forward + backward (train mode):",
        encoder_table,
        "",
        "dataflows (op: dataflow): " + "; ".join(f"{op}: {flow}" for op, flow in flows),
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"profile-{args.arch}.txt"
    path.write_text("\n".join(lines))
    print("\n".join(lines[:6]))
    print(f"wrote {path}")
    return 0


def traffic_report(args: argparse.Namespace) -> int:
    """Layout traffic of the sparse encoder's forward + backward, float32 and bf16 autocast."""
    encoder = spark_me.create_encoder(args.arch)
    model = spark_me.SparK(encoder, mask_ratio=args.mask_ratio)
    encoder.set_dataflow(args.dataflow)
    images = torch.randn(args.batch_size, 3, args.size, args.size)
    active = model.mask(images)

    def encoder_step() -> None:
        encoder.zero_grad(set_to_none=True)
        sum(f.F.float().sum() for f in encoder.forward_sparse(sparsify(images, active))).backward()

    tables = {}
    for label, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        autocast = torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with autocast:
            encoder_step()  # warm-up: dataflow choices, kernel builds
            itemsize = torch.finfo(dtype or torch.float32).bits // 8  # of cat's tensor lists
            tables[label] = traffic.measure(encoder_step, list_itemsize=itemsize)
    flows = sorted({(op, flow) for _, op, flow in encoder.dataflow_table()})
    lines = [
        f"# layout traffic: sparse {args.arch} encoder forward + backward, {args.size} px, batch "
        f"{args.batch_size}, mask {args.mask_ratio}, dataflow {args.dataflow}, torch {torch.__version__}",
        f"CPU: {machine.cpu_line(machine.cpu())} (counts and bytes do not depend on it; times would)",
        "",
        *traffic.markdown(tables),
        "",
        "dataflows (op: dataflow): " + "; ".join(f"{op}: {flow}" for op, flow in flows),
    ]
    for label, table in tables.items():
        busiest = sorted(table.items(), key=lambda kv: -kv[1].calls)[:25]
        lines += ["", f"## {label}: aten ops by calls", ""]
        lines += [f"    {row.calls:6d}  {op}" for op, row in busiest]
        lines += ["", f"## {label}: sources (calls, MB, autograd node | function)", ""]
        lines += ["    " + line for line in traffic.sources(table)]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"traffic-{args.arch}.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:16]))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
