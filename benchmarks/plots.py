"""Throughput and peak memory vs mask ratio, one panel per architecture (matplotlib)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {"sparse": ("tab:red", "o"), "masked_dense": ("tab:blue", "s"), "dense": ("tab:gray", None)}


def plot(rows: list[dict], out: Path) -> None:
    rows = [r for r in rows if "error" not in r]
    keys = sorted({(r["arch"], r["size"]) for r in rows})
    if not keys:
        return
    for metric, label, name in (
        ("images_per_s", "images / s", "throughput.png"),
        ("peak_mem_mib", "peak memory (MiB)", "memory.png"),
    ):
        fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4), squeeze=False)
        for ax, (arch, size) in zip(axes[0], keys, strict=True):
            for variant, (color, marker) in STYLE.items():
                pts = sorted(
                    (r["mask_ratio"], r[metric])
                    for r in rows
                    if (r["arch"], r["size"], r["variant"]) == (arch, size, variant)
                )
                if not pts:
                    continue
                if len(pts) == 1 and variant == "dense":  # older runs: one dense row, drawn across
                    ax.axhline(pts[0][1], color=color, linestyle="--", label="dense")
                else:
                    ax.plot(
                        *zip(*pts, strict=True), color=color, marker=marker, label=variant.replace("_", "-")
                    )
            ax.set_title(f"{arch} @ {size}px")
            ax.set_xlabel("mask ratio")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)


def plot_encoder_speedup(rows: list[dict], out: Path) -> None:
    """Encoder fwd+bwd speed-up of sparse over masked-dense (solid) and over the dense encoder on the
    whole image (dashed) vs mask ratio, one panel per arch, with the physical limit 1 / (1 - ratio)
    of work proportional to the visible sites (relative to dense; the masked-dense reference also
    pays for its re-masking, so the solid line may pass it)."""
    archs = sorted({r["arch"] for r in rows})
    if not archs:
        return
    fig, axes = plt.subplots(1, len(archs), figsize=(3.6 * len(archs), 3.4), squeeze=False)
    for ax, arch in zip(axes[0], archs, strict=True):
        mine = [r for r in rows if r["arch"] == arch]
        ratios = sorted({r["mask_ratio"] for r in mine})
        grid = [x / 100 for x in range(0, 1 + int(max(ratios) * 100))]
        ax.plot(grid, [1 / (1 - x) for x in grid], color="black", linestyle=":", label="limit 1/(1-ratio)")
        ax.axhline(1.0, color="tab:blue", linewidth=0.8)
        for amp, color in (("none", "tab:red"), ("bf16", "tab:orange"), ("fp16", "tab:green")):
            for key, versus, style in (
                ("sparse_vs_masked_dense", "masked-dense", "-"),
                ("sparse_vs_dense", "dense", "--"),
            ):
                pts = sorted((r["mask_ratio"], r[key]) for r in mine if r["amp"] == amp)
                if pts:
                    label = f"vs {versus}" + ("" if amp == "none" else f" ({amp})")
                    ax.plot(*zip(*pts, strict=True), color=color, marker="o", linestyle=style, label=label)
        ax.set_title(f"{arch} encoder, batch {mine[0]['batch']}")
        ax.set_xlabel("mask ratio")
        ax.set_ylabel("speed-up (fwd+bwd)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
