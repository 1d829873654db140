"""Speed and memory of a full SparK pretraining step: sparse (ME) vs masked-dense vs dense.

    spark-me bench --archs resnet50 convnext_tiny --sizes 224 --ratios 0 0.6 0.9 --out benchmarks/results/cpu

Each configuration runs in its own process (so peak memory is its own): warm-up steps, then the
median of timed steps of zero_grad + forward + backward + LAMB step, and of the encoder alone
(forward + backward). Every variant runs at every mask ratio; the dense one (encoder on the whole
image, decoder and loss at the ratio's mask) is also timed against plain timm training. Peak
memory: CUDA max allocated on a GPU; on the CPU the peak resident set (VmHWM) minus the resident set
before the first step. Results: JSON + CSV + PNG plots.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.encoder import seconds
from spark_me.cli_parser import OneLineErrorParser

log = logging.getLogger("spark_me.bench")

VARIANTS = ("sparse", "masked_dense", "dense")
DEFAULT_ARCHS = ("resnet18", "resnet50", "convnext_tiny", "convnextv2_tiny")
DEFAULT_RATIOS = (0.0, 0.25, 0.5, 0.6, 0.75, 0.9)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default."""


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def measure(
    arch: str,
    variant: str,
    batch: int,
    size: int,
    ratio: float,
    steps: int,
    warmup: int,
    device: str,
    decoder_width: int = 768,
    amp: str = "none",
    clock: str = "wall",
) -> dict:
    """One configuration, in this process. `amp`: "none", "bf16" or "fp16" autocast for the step.
    `clock`: "wall" seconds, or "cpu" (this process's CPU time: a busy host's other processes do not
    stretch it; with one thread, the work done; a GPU's work is not in it).

    The dense variant is also timed against plain timm training (`timm_step_s`, the same LAMB),
    interleaved after its peak memory was read, so that the timm model does not count in it."""
    import torch

    import spark_me
    from benchmarks.variants import bench_step, timm_step

    dev = torch.device(device)
    tick = time.process_time if clock == "cpu" else time.perf_counter
    torch.manual_seed(0)
    images = torch.randn(batch, 3, size, size, device=dev)
    active = spark_me.random_mask(batch, size, size, ratio, device=dev)
    step = bench_step(variant, arch, images, active, decoder_width, amp)

    rss_before = _rss_kib("VmRSS")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for _ in range(warmup):
        step.full_step()
    times = [seconds(step.full_step, dev, tick) for _ in range(steps)]
    peak = (
        torch.cuda.max_memory_allocated(dev)
        if dev.type == "cuda"
        else (_rss_kib("VmHWM") - rss_before) * 1024
    )
    enc_times = [seconds(step.encoder_step, dev, tick) for _ in range(max(1, steps))]
    step_s = statistics.median(times)
    row = {
        "arch": arch,
        "variant": variant,
        "batch": batch,
        "size": size,
        "mask_ratio": ratio,
        "step_s": step_s,
        "images_per_s": batch / step_s,
        "encoder_step_s": statistics.median(enc_times),
        "peak_mem_mib": peak / 2**20,
        "step_times": times,
        "amp": amp,
        "clock": clock,
        "dataflows": step.model.encoder.dataflow_table()
        if hasattr(step.model.encoder, "dataflow_table")
        else None,
    }
    if variant == "dense":
        row.update(against_timm(step, timm_step(arch, images, amp), dev, max(1, steps), tick))
    return row


def against_timm(dense, reference, dev, rounds: int, tick=time.perf_counter) -> dict:
    """The dense step vs plain timm training, interleaved round by round (a busy host slows both):
    the whole step vs timm's training step (`vs_timm`: SparK's decoder and its LAMB step count in
    the dense one only), and the encoder's forward + backward vs timm's `forward_features` +
    backward (`encoder_vs_timm`: the same network's work, what the sparse and masked-dense rows
    are compared on). Ratios of medians."""
    reference.full_step()  # its warm-up
    whole, encoder = [], []
    for _ in range(rounds):
        whole.append((seconds(dense.full_step, dev, tick), seconds(reference.full_step, dev, tick)))
        encoder.append((seconds(dense.encoder_step, dev, tick), seconds(reference.encoder_step, dev, tick)))
    out = {}
    for key, pairs in (("", whole), ("encoder_", encoder)):
        out[f"timm_{key}step_s"] = statistics.median(t for _, t in pairs)
        out[f"{key}vs_timm"] = statistics.median(d for d, _ in pairs) / out[f"timm_{key}step_s"]
    model = dense.model
    out["decoder_mparams"] = (
        sum(p.numel() for name, p in model.named_parameters() if not name.startswith("encoder.")) / 1e6
    )  # densify + decoder: the parameters plain timm does not have
    return out


def timm_line(row: dict) -> str:
    """The dense row against plain timm in words: the encoder part, the whole step, and what the
    rest of the step is when the whole step costs more than twice timm's."""
    text = (
        f"dense encoder fwd+bwd = x{row['encoder_vs_timm']:.2f} plain timm's forward_features+backward "
        f"({row['timm_encoder_step_s']:.3f} s); whole dense step = x{row['vs_timm']:.2f} timm's training "
        f"step ({row['timm_step_s']:.3f} s, interleaved)"
    )
    if row["vs_timm"] > 2:
        text += (
            f": the rest is SparK's densify + decoder ({row['decoder_mparams']:.1f} M parameters that timm "
            "does not have, their forward and backward) and the LAMB step over them; a smaller "
            "--decoder_width shrinks it"
        )
    return text


def environment(device: str) -> dict:
    import MinkowskiEngine as ME
    import torch

    from benchmarks.machine import cpu

    cpu_info = cpu()
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "minkowskiengine": ME.__version__,
        "cuda": torch.version.cuda,
        "device": device,
        "threads": torch.get_num_threads(),
        "cpu": cpu_info["model"],
        "cpu_flags": cpu_info["flags"],  # avx512_bf16 / amx decide whether bf16 pays
        "machine": platform.machine(),
        "cores": os.cpu_count(),
    }
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def configs(args) -> list[dict]:
    """Every variant at every ratio (the dense variant's decoder and loss run at the ratio's mask,
    so each ratio's rows are compared with a dense step of the same run)."""
    return [
        dict(arch=arch, variant=variant, size=size, ratio=ratio)
        for arch in args.archs
        for size in args.sizes
        for ratio in args.ratios
        for variant in VARIANTS
        if variant in args.variants
    ]


def run_isolated(cfg: dict, args) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.harness",
        "--one",
        json.dumps(cfg),
        "--batch_size",
        str(args.batch_size),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--device",
        args.device,
        "--decoder_width",
        str(args.decoder_width),
        "--amp",
        args.amp,
        "--clock",
        args.clock,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        return {**cfg, "mask_ratio": cfg["ratio"], "error": result.stderr.strip().splitlines()[-1:]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def ratios_table(rows: list[dict]) -> list[dict]:
    """Per (arch, size, ratio): sparse vs masked-dense and vs dense, from the same run."""
    by = {(r["arch"], r["size"], r["variant"], r["mask_ratio"]): r for r in rows if "error" not in r}
    table = []
    for (arch, size, variant, ratio), r in sorted(by.items()):
        if variant != "sparse":
            continue
        md, dn = by.get((arch, size, "masked_dense", ratio)), by.get((arch, size, "dense", ratio))
        table.append(
            {
                "arch": arch,
                "size": size,
                "mask_ratio": ratio,
                "speedup_vs_masked_dense": md["step_s"] / r["step_s"] if md else None,
                "memory_vs_masked_dense": r["peak_mem_mib"] / md["peak_mem_mib"]
                if md and md["peak_mem_mib"]
                else None,
                "speedup_vs_dense": dn["step_s"] / r["step_s"] if dn else None,
                "memory_vs_dense": r["peak_mem_mib"] / dn["peak_mem_mib"]
                if dn and dn["peak_mem_mib"]
                else None,
            }
        )
    return table


def write(out: Path, env: dict, rows: list[dict], args) -> None:
    out.mkdir(parents=True, exist_ok=True)
    summary = ratios_table(rows)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "one"}
    payload = {"environment": env, "settings": settings, "results": rows, "ratios": summary}
    (out / "results.json").write_text(json.dumps(payload, indent=1))
    fields = [
        "arch",
        "variant",
        "size",
        "batch",
        "mask_ratio",
        "amp",
        "step_s",
        "images_per_s",
        "encoder_step_s",
        "peak_mem_mib",
        "timm_step_s",
        "vs_timm",
        "timm_encoder_step_s",
        "encoder_vs_timm",
        "error",
    ]
    with open(out / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    try:
        from benchmarks.plots import plot

        plot(rows, out)
    except ImportError as err:
        log.warning("no plots (%s): pip install matplotlib", err)


def main(argv: list[str] | None = None) -> int:
    p = OneLineErrorParser(prog="spark-me bench", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--archs", nargs="+", default=list(DEFAULT_ARCHS), help="encoders")
    p.add_argument("--sizes", nargs="+", type=int, default=[224], help="image sizes (multiples of 32)")
    p.add_argument(
        "--ratios", nargs="+", type=float, default=list(DEFAULT_RATIOS), help="mask ratios (every variant)"
    )
    p.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANTS),
        choices=list(VARIANTS),
        help="dense: the encoder on the whole image, decoder and loss at the run's mask ratio",
    )
    p.add_argument("--batch_size", type=int, default=None, help="default: 32 on a GPU, 4 on the CPU")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--decoder_width", type=int, default=768, help="SparK decoder width")
    p.add_argument("--device", default=None, help="cuda when available, else cpu")
    p.add_argument(
        "--amp", default="none", choices=["none", "bf16", "fp16"], help="autocast dtype of the step"
    )
    p.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="cpu: each process's CPU time, which a busy host's other processes do not stretch "
        "(meaningful on the CPU, with OMP_NUM_THREADS=1)",
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/latest"), help="results folder")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        log.error("error: --device %s, but torch %s sees no CUDA GPU", args.device, torch.__version__)
        return 2
    args.batch_size = args.batch_size or (32 if args.device.startswith("cuda") else 4)
    if args.one:  # child process: one configuration, JSON on stdout
        cfg = json.loads(args.one)
        row = measure(
            cfg["arch"],
            cfg["variant"],
            args.batch_size,
            cfg["size"],
            cfg["ratio"],
            args.steps,
            args.warmup,
            args.device,
            args.decoder_width,
            args.amp,
            args.clock,
        )
        print(json.dumps(row))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    env = environment(args.device)
    log.info("environment: %s", env)
    todo = configs(args)
    rows = []
    for i, cfg in enumerate(todo, 1):
        row = run_isolated(cfg, args)
        rows.append(row)
        if "error" in row:
            log.warning("[%d/%d] %s: FAILED %s", i, len(todo), cfg, row["error"])
        else:
            log.info(
                "[%d/%d] %-16s %-12s %4d px ratio %.2f: %6.3f s/step %7.1f img/s  enc %6.3f s  peak %.0f MiB",
                i,
                len(todo),
                cfg["arch"],
                cfg["variant"],
                cfg["size"],
                cfg["ratio"],
                row["step_s"],
                row["images_per_s"],
                row["encoder_step_s"],
                row["peak_mem_mib"],
            )
            if "vs_timm" in row:
                log.info("    %s", timm_line(row))
        write(args.out, env, rows, args)  # partial results survive an interruption
    for row in rows:
        if row.get("dataflows"):
            log.info("dataflows of %s, mask %.2f (layer, op, dataflow):", row["arch"], row["mask_ratio"])
            for name, op, flow in row["dataflows"]:
                log.info("    %-34s %-30s %s", name, op, flow)
    for r in ratios_table(rows):
        log.info(
            "%-16s %4d px ratio %.2f: sparse vs masked-dense speed x%.2f memory x%.2f | vs dense speed x%.2f",
            r["arch"],
            r["size"],
            r["mask_ratio"],
            r["speedup_vs_masked_dense"] or float("nan"),
            r["memory_vs_masked_dense"] or float("nan"),
            r["speedup_vs_dense"] or float("nan"),
        )
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
