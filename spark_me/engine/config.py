"""Pretraining configuration: MAE-style flags, an optional YAML file, SparK's recipe as defaults.

Precedence: command-line flag > YAML file > preset > SparK recipe default. With no `--data_path`
the run uses the 16 embedded photographs and the `demo` preset (small model, small images, a few
minutes on 2 CPU cores); every option set explicitly still wins.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class PretrainConfig:
    # model
    arch: str = "resnet50"
    model_kwargs: dict = field(default_factory=dict)  # architecture-shaping kwargs (depths, dims, ...)
    drop_path: float | None = None  # None: SparK's per-arch default
    decoder_width: int = 768
    mask_ratio: float = 0.6
    input_size: int = 224
    # data
    data_path: str | None = None
    num_workers: int = 8
    # optimisation (SparK recipe)
    batch_size: int = 32  # per GPU / process
    accum_iter: int = 1
    epochs: int = 1600
    warmup_epochs: int = 40
    blr: float = 2e-4  # lr = blr * effective batch / 256
    lr: float | None = None  # absolute lr (overrides blr)
    min_lr_ratio: float = 0.001  # cosine ends at lr * min_lr_ratio ...
    min_lr: float | None = None  # ... or at this absolute value
    warmup_lr_ratio: float = 0.005  # warmup starts at lr * warmup_lr_ratio
    weight_decay: float = 0.04
    weight_decay_end: float = 0.2
    clip_grad: float = 5.0
    betas: tuple[float, float] | None = None  # None: (0.9, 0.95) for ResNets, (0.9, 0.999) for ConvNeXts
    amp: bool = False
    amp_dtype: str = "bf16"  # bf16 | fp16 (fp16 uses a GradScaler)
    # bookkeeping
    output_dir: str = "output"
    log_dir: str | None = None  # tensorboard; default: output_dir/tb
    save_every: int = 50  # also keep checkpoint-{epoch}.pth every N epochs
    keep_last: int = 3
    resume: str | None = None
    auto_resume: bool = True
    init_weight: str | None = None  # encoder weights to start from (timm or sparse layout)
    seed: int = 0
    device: str | None = None  # default: cuda if available
    recon_every: int = 1  # epochs between reconstruction pictures
    preset: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain Python types only, so checkpoints load with torch.load(weights_only=True)."""
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas) if self.betas else None
        out["model_kwargs"] = {
            k: list(v) if isinstance(v, tuple) else v for k, v in self.model_kwargs.items()
        }
        return out


# SparK's drop-path rates per encoder
DROP_PATH = {
    "resnet50": 0.05,
    "resnet101": 0.08,
    "resnet152": 0.10,
    "resnet200": 0.15,
    "convnext_small": 0.2,
    "convnext_base": 0.3,
    "convnext_large": 0.4,
}

PRESETS: dict[str, dict[str, Any]] = {
    # the zero-argument run: 16 photographs, a ResNet-18 at 128 px, about 3 minutes on 2 CPU cores
    "demo": dict(
        arch="resnet18",
        input_size=128,
        batch_size=8,
        epochs=60,
        warmup_epochs=5,
        blr=0.15,
        decoder_width=256,
        num_workers=0,
        save_every=20,
        recon_every=10,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spark-me pretrain", description="SparK pretraining on sparse tensors.")
    add = p.add_argument
    add("--config", type=Path, help="YAML file with any of the options below (flags override it)")
    add(
        "--preset",
        choices=sorted(PRESETS),
        help="named option set; 'demo' is used when --data_path is not given",
    )
    add("--arch", help="encoder: spark-me/timm name, e.g. resnet50, convnextv2_tiny")
    add(
        "--model_kwargs",
        type=yaml.safe_load,
        help="YAML mapping of encoder kwargs, e.g. '{depths: [1,1,3,1]}'",
    )
    add("--drop_path", type=float)
    add("--decoder_width", type=int)
    add("--mask_ratio", type=float)
    add("--input_size", type=int, help="crop size, a multiple of 32")
    add("--data_path", help="folder of images (flat or ImageFolder tree); default: the embedded photographs")
    add("--num_workers", type=int)
    add("--batch_size", type=int, help="per GPU / process")
    add(
        "--accum_iter",
        type=int,
        help="micro-batches per optimiser step; when it does not divide the batches of an epoch, "
        "the last (batches %% accum_iter) of each epoch are dropped (no update from a partial group)",
    )
    add("--epochs", type=int)
    add("--warmup_epochs", type=int)
    add("--blr", type=float, help="base lr: lr = blr * batch_size * accum_iter * world_size / 256")
    add("--lr", type=float, help="absolute lr (overrides --blr)")
    add("--min_lr", type=float, help="final lr of the cosine (default lr * 0.001)")
    add("--weight_decay", type=float)
    add("--weight_decay_end", type=float)
    add("--clip_grad", type=float)
    add(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="mixed precision for the dense parts",
    )
    add("--amp_dtype", choices=("bf16", "fp16"))
    add("--output_dir")
    add("--log_dir")
    add("--save_every", type=int)
    add("--keep_last", type=int)
    add("--resume", help="full checkpoint to continue from (model, optimiser, schedule, epoch)")
    add("--auto_resume", action=argparse.BooleanOptionalAction, default=None, help="resume from output_dir")
    add("--init_weight", help="encoder weights only (timm or sparse layout); training starts at epoch 0")
    add("--seed", type=int)
    add("--device")
    add("--recon_every", type=int)
    return p


def resolve(argv: list[str] | None = None) -> PretrainConfig:
    args = build_parser().parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None and k != "config"}
    from_file: dict[str, Any] = {}
    if args.config:
        if not args.config.is_file():
            raise FileNotFoundError(f"no such config file: {args.config}")
        from_file = yaml.safe_load(args.config.read_text()) or {}
        unknown = set(from_file) - {f.name for f in dataclasses.fields(PretrainConfig)}
        if unknown:
            raise ValueError(f"unknown option(s) in {args.config}: {', '.join(sorted(unknown))}")
    merged = {**from_file, **given}
    preset = merged.get("preset") or (None if merged.get("data_path") else "demo")
    values = {**PRESETS.get(preset, {}), **merged, "preset": preset}
    if values.get("betas") is not None:
        values["betas"] = tuple(values["betas"])
    return PretrainConfig(**values)
