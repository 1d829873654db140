"""What a benchmark ran on: ratios between sparse and dense kernels differ from one CPU to the next
(AVX2-only parts emulate bf16; AVX512-BF16 and AMX parts run it natively), so every result records
the CPU model, the flags that decide the bf16 / int8 paths, the cores and torch's thread count."""

from __future__ import annotations

import os
import platform
from pathlib import Path

FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")


def cpu() -> dict:
    """{"model": ..., "flags": [the FLAGS present], "cores": ..., "threads": torch's threads}."""
    import torch

    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    return {
        "model": model,
        "flags": [f for f in FLAGS if f in flags],
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }


def cpu_line(info: dict) -> str:
    """One line: 'AMD EPYC (2 cores, 2 threads; avx2 avx512f avx512_bf16)'."""
    return f"{info['model']} ({info['cores']} cores, {info['threads']} threads; {' '.join(info['flags'])})"


def write_result(path: Path, rows: list[dict]) -> None:
    """A benchmark's JSON: {"cpu": cpu(), "threads": torch's threads, "rows": rows}."""
    import json

    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"cpu": cpu(), "threads": torch.get_num_threads(), "rows": rows}, indent=1))


def add_shape_args(parser, repeats: int) -> None:
    """The flags of the small interleaved benchmarks (conv_flows, fold_bn_relu): batch, image size,
    mask ratio, repeats, JSON output."""
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--ratio", type=float, default=0.6)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--out", type=Path, default=None, help="write results JSON here")


def announce(log) -> None:
    """Timestamped INFO logging, and the CPU and thread count as the first line."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    log.info("on %s", cpu_line(cpu()))
