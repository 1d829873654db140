"""Where the time of a sparse SparK step goes.

    python -m benchmarks.profile --arch resnet50 --size 224 --batch_size 4 --out benchmarks/results/cpu

Three views, written to profile-<arch>.txt:
1. stages of the forward (record_function labels in SparK: encode, densify, decode, loss), and
   forward + backward of the whole step, from torch.profiler;
2. the top operators (forward and autograd backward nodes, e.g. MinkowskiConvolutionFunctionBackward);
3. the sparse encoder alone (forward + backward) and the dataflow its tuner chose per op;
4. the cost of building coordinate and kernel maps: the same sparse encoder forward on a fresh
   coordinate manager (maps built) vs on the manager of the previous call (maps reused).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import spark_me
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
    args = p.parse_args(argv)
    torch.manual_seed(0)
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


if __name__ == "__main__":
    raise SystemExit(main())
