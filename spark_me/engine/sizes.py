"""What a pretraining run writes to disk, computed from the model's tensors before anything is saved.

A checkpoint holds the SparK model's state_dict (encoder, densify, decoder: parameters and BN
buffers) and LAMB's two moment tensors per trainable parameter (`exp_avg`, `exp_avg_sq`, each the
parameter's shape and dtype); the timm export holds the encoder's state_dict alone. Pickle and zip
framing add well under 1 %, so byte counts of the tensors are the file sizes. `python -m
spark_me.engine.sizes` prints the table the README quotes.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from torch import nn


def state_bytes(module: nn.Module) -> int:
    """Bytes of `module.state_dict()`'s tensors (parameters and buffers)."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


@dataclass(frozen=True)
class CheckpointSizes:
    weights: int  # the SparK model's state_dict (encoder + densify + decoder)
    optimizer: int  # LAMB's exp_avg and exp_avg_sq
    timm: int  # the encoder alone, as exported to timm-*.pth

    @property
    def checkpoint(self) -> int:
        """checkpoint-*.pth: weights and optimiser state."""
        return self.weights + self.optimizer


def checkpoint_sizes(model: nn.Module) -> CheckpointSizes:
    """Sizes of a SparK model's files; `model.encoder` is what the timm export holds."""
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return CheckpointSizes(state_bytes(model), 2 * trainable, state_bytes(model.encoder))


def numbered_kept(epochs: int, save_every: int, keep_last: int) -> int:
    """How many checkpoint-NNNN.pth a run of `epochs` leaves (one per `save_every` epochs, the
    newest `keep_last` of them; 0 keeps all)."""
    made = epochs // save_every if save_every > 0 else 0
    return min(made, keep_last) if keep_last > 0 else made


def run_bytes(sizes: CheckpointSizes, epochs: int, save_every: int, keep_last: int) -> int:
    """Checkpoints and timm exports left at the end of a run (-last plus the numbered ones)."""
    return (1 + numbered_kept(epochs, save_every, keep_last)) * (sizes.checkpoint + sizes.timm)


def mib(size: int) -> str:
    return f"{size / 2**20:.0f} MiB"


def main(argv: list[str] | None = None) -> None:
    """Markdown table of file sizes per architecture (builds each model on the CPU; no data)."""
    import logging

    from spark_me.engine.config import PretrainConfig
    from spark_me.engine.pretrain import build_model

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--archs", nargs="+", default=["resnet18", "resnet50", "resnet101", "resnet152"])
    p.add_argument("--decoder_width", type=int, default=768)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    lines = [
        f"| arch (decoder {args.decoder_width}) | checkpoint (+ LAMB state) | weights only | timm export |",
        "|---|---|---|---|",
    ]
    for arch in args.archs:
        sizes = checkpoint_sizes(build_model(PretrainConfig(arch=arch, decoder_width=args.decoder_width)))
        lines.append(f"| {arch} | {mib(sizes.checkpoint)} | {mib(sizes.weights)} | {mib(sizes.timm)} |")
    logging.getLogger(__name__).info("\n".join(lines))


if __name__ == "__main__":
    main()
