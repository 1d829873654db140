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
