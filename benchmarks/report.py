"""Markdown tables from a results.json (what benchmarks/README.md shows).

python -m benchmarks.report benchmarks/results/cpu/results.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def tables(path: Path) -> str:
    data = json.loads(Path(path).read_text())
    env, rows = data["environment"], [r for r in data["results"] if "error" not in r]
    where = env.get("gpu") or f"{env['cpu']} ({env['threads']} threads)"
    batch = rows[0]["batch"] if rows else "?"
    lines = [
        f"Device: {where}; torch {env['torch']}, MinkowskiEngine {env['minkowskiengine']}; batch {batch}, "
        f"median of {data['settings']['steps']} steps after {data['settings']['warmup']} warm-up.",
        "",
        "| arch | px | mask | sparse step s | masked-dense step s | dense step s | sparse enc s | "
        "masked-dense enc s | dense enc s | sparse MiB | masked-dense MiB | dense MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by = {(r["arch"], r["size"], r["variant"], r["mask_ratio"]): r for r in rows}
    for (arch, size, variant, ratio), s in sorted(by.items()):
        if variant != "sparse":
            continue
        md = by.get((arch, size, "masked_dense", ratio), {})
        # a dense row per ratio; older runs measured one, at ratio 0
        dn = by.get((arch, size, "dense", ratio)) or by.get((arch, size, "dense", 0.0), {})
        cells = [
            arch,
            size,
            ratio,
            s["step_s"],
            md.get("step_s"),
            dn.get("step_s"),
            s["encoder_step_s"],
            md.get("encoder_step_s"),
            dn.get("encoder_step_s"),
            s["peak_mem_mib"],
            md.get("peak_mem_mib"),
            dn.get("peak_mem_mib"),
        ]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    lines += [
        "",
        "| arch | px | mask | step speed vs masked-dense | memory vs masked-dense | "
        "encoder speed vs masked-dense | step speed vs dense |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in data["ratios"]:
        s = by[(r["arch"], r["size"], "sparse", r["mask_ratio"])]
        md = by.get((r["arch"], r["size"], "masked_dense", r["mask_ratio"]))
        enc = md["encoder_step_s"] / s["encoder_step_s"] if md else None
        cells = [
            r["arch"],
            r["size"],
            r["mask_ratio"],
            _x(r["speedup_vs_masked_dense"]),
            _x(r["memory_vs_masked_dense"]),
            _x(enc),
            _x(r["speedup_vs_dense"]),
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if value < 100 else f"{value:.0f}"
    return str(value)


def _x(value) -> str:
    return "-" if value is None else f"x{value:.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Markdown tables from a benchmark results.json.")
    p.add_argument("results", nargs="?", type=Path, default=Path("benchmarks/results/cpu/results.json"))
    args = p.parse_args(argv)
    if not args.results.is_file():
        p.error(f"no such results file: {args.results} (run `spark-me bench --out DIR` first)")
    print(tables(args.results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
