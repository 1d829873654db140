"""Fine-tuning configuration: MAE/SparK-style flags, an optional YAML file, SparK's recipe as defaults.

Precedence: command-line flag > YAML file > the architecture's recipe (`recipes.recipe_for`) >
the defaults below. Impossible values are refused here, in one line, before any data or model is
touched. The data, size and batch options are shared with `spark-me probe` (`add_data_options`).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spark_me.cli_parser import OneLineErrorParser
from spark_me.engine.config import type_problems
from spark_me.engine.config_input import output_dir_problem, yaml_mapping
from spark_me.engine.options import read_yaml_options
from spark_me.engine.recipes import recipe_for


@dataclass
class FinetuneConfig:
    # model and weights
    arch: str = "resnet50"
    model_kwargs: dict = field(default_factory=dict)  # architecture-shaping kwargs (depths, dims, ...)
    weights: str | None = None  # pretraining checkpoint, timm-*.pth export or timm weights; None: scratch
    # data
    data_path: str | None = None  # DIR with DIR/train and DIR/val ImageFolder trees
    input_size: int = 224
    num_workers: int = 8
    aa: str = "rand-m9-mstd0.5-inc1-mmax9"  # timm RandAugment spec ("none": off); mmax9: see aa_problem
    reprob: float = 0.25  # random erasing probability (SparK: 0.25, pixel mode)
    crop_pct: float = 0.95  # validation: resize to input_size / crop_pct, centre crop (SparK: 0.95)
    # optimisation; None: from the architecture's recipe
    batch_size: int = 128  # per process (SparK: a global batch of 4096)
    accum_iter: int = 1
    epochs: int | None = None
    warmup_epochs: int | None = None
    opt: str | None = None
    blr: float | None = None  # lr = blr * effective batch / 256
    lr: float | None = None  # absolute lr (overrides blr)
    min_lr_ratio: float = 0.001  # cosine ends at lr * min_lr_ratio (SparK) ...
    min_lr: float | None = None  # ... or at this absolute value
    warmup_lr_ratio: float = 0.005  # warmup starts at lr * warmup_lr_ratio (SparK)
    weight_decay: float | None = None
    layer_decay: float | None = None
    clip_grad: float | None = None  # None: no clipping (SparK)
    # regularisation
    mixup: float | None = None  # Mixup alpha
    cutmix: float = 1.0  # CutMix alpha (SparK: 1.0 whenever Mixup is on)
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    smoothing: float = 0.1
    rep_aug: int | None = None
    drop_path: float | None = None
    ema: float | None = None  # EMA decay; 0: no EMA model
    # run
    amp: bool = False
    amp_dtype: str = "bf16"
    sync_bn: bool = True
    output_dir: str = "output-finetune"
    log_dir: str | None = None  # tensorboard; default: output_dir/tb
    save_every_steps: int = 0  # also checkpoint-mid-epoch.pth every N optimiser steps (0: never)
    resume: str | None = None
    auto_resume: bool = True
    eval: bool = False  # evaluate --weights on val only
    seed: int = 0
    device: str | None = None
    recipe: str = ""  # filled in: where the recipe values came from

    def to_dict(self) -> dict[str, Any]:
        """Plain Python types only, so checkpoints load with torch.load(weights_only=True)."""
        return dataclasses.asdict(self)


RECIPE_FIELDS = (
    "epochs",
    "warmup_epochs",
    "opt",
    "blr",
    "layer_decay",
    "weight_decay",
    "mixup",
    "rep_aug",
    "drop_path",
    "ema",
)


def add_data_options(p: argparse.ArgumentParser) -> None:
    """Options that `finetune` and `probe` share: data, model, weights, size, batch, device."""
    add = p.add_argument
    add("--config", type=Path, help="YAML file with any of the options below (flags override it)")
    add("--data_path", help="folder holding train/ and val/ ImageFolder trees (one sub-folder per class)")
    add("--arch", help="timm model name, e.g. resnet50, convnext_tiny (the pretraining --arch)")
    add("--model_kwargs", type=yaml_mapping, help="YAML mapping, e.g. '{depths: [1,1,3,1]}'")
    add(
        "--weights",
        help="a spark-me pretraining checkpoint (checkpoint-*.pth), a timm-*.pth export or timm "
        "weights; none: random initialisation",
    )
    add("--input_size", type=int, help="image side in pixels")
    add("--batch_size", type=int, help="per process")
    add("--num_workers", type=int)
    add("--output_dir")
    add("--seed", type=int)
    add("--device", help="default: cuda if available")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        prog="spark-me finetune",
        description="Classification fine-tuning of the dense timm model (SparK's downstream recipe).",
    )
    add_data_options(p)
    add = p.add_argument
    add("--aa", help="timm RandAugment spec, e.g. rand-m9-mstd0.5-inc1-mmax9; 'none' turns it off")
    add("--reprob", type=float, help="random erasing probability")
    add("--crop_pct", type=float, help="validation centre crop fraction")
    add("--accum_iter", type=int, help="micro-batches per optimiser step")
    add("--epochs", type=int)
    add("--warmup_epochs", type=int)
    add("--opt", help="timm optimiser name (lamb, adamw, sgd, ...)")
    add("--blr", type=float, help="base lr: lr = blr * batch_size * accum_iter * world_size / 256")
    add("--lr", type=float, help="absolute lr (overrides --blr)")
    add("--min_lr", type=float, help="final lr of the cosine (default lr * 0.001)")
    add("--weight_decay", type=float)
    add("--layer_decay", type=float, help="layer-wise lr decay factor (1: off)")
    add("--clip_grad", type=float, help="clip the gradient norm at this value")
    add("--mixup", type=float, help="Mixup alpha (0: off)")
    add("--cutmix", type=float, help="CutMix alpha (0: off)")
    add("--mixup_prob", type=float, help="probability of mixing a batch")
    add("--mixup_switch_prob", type=float, help="probability of CutMix instead of Mixup")
    add("--smoothing", type=float, help="label smoothing")
    add("--rep_aug", type=int, help="repeated augmentation count (0: off)")
    add("--drop_path", type=float)
    add("--ema", type=float, help="EMA decay of the weights (0: no EMA model)")
    add("--amp", action=argparse.BooleanOptionalAction, default=None, help="mixed precision (--amp_dtype)")
    add("--amp_dtype", choices=("bf16", "fp16"))
    add("--sync_bn", action=argparse.BooleanOptionalAction, default=None, help="SyncBatchNorm under DDP")
    add("--log_dir", help="tensorboard folder (default output_dir/tb)")
    add(
        "--save_every_steps",
        type=int,
        help="also save checkpoint-mid-epoch.pth every N optimiser steps, to resume mid-epoch (for "
        "clusters that kill jobs without SIGTERM/SIGUSR1 first; 0: only on those signals)",
    )
    add("--resume", help="full fine-tuning checkpoint to continue from")
    add("--auto_resume", action=argparse.BooleanOptionalAction, default=None, help="resume from output_dir")
    add("--eval", action="store_true", default=None, help="only evaluate --weights on val/ (top-1, top-5)")
    return p


def merge_options(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """Flags over the YAML file (both as given, None meaning 'not given')."""
    given = {k: v for k, v in vars(args).items() if v is not None and k != "config"}
    from_file = read_yaml_options(args.config, cls) if args.config else {}
    return {**from_file, **given}


def resolve(argv: list[str] | None = None) -> FinetuneConfig:
    values = merge_options(build_parser().parse_args(argv), FinetuneConfig)
    arch = values.get("arch", FinetuneConfig.arch)
    recipe, source = recipe_for(arch if isinstance(arch, str) else "")
    defaults = {k: v for k, v in recipe.as_dict().items() if values.get(k) is None}
    epochs = values.get("epochs")
    if "warmup_epochs" in defaults and isinstance(epochs, int) and epochs != recipe.epochs:
        # a shorter (or longer) run than the recipe's keeps the recipe's share of warmup
        defaults["warmup_epochs"] = round(recipe.warmup_epochs * epochs / recipe.epochs)
    cfg = validate(FinetuneConfig(**{**values, **defaults, "recipe": source}))
    raise_output_problems(cfg)
    return cfg


def raise_output_problems(cfg: Any) -> None:
    """--output_dir and --log_dir must be folders that can be written (checked before any work)."""
    for flag, folder in (("--output_dir", cfg.output_dir), ("--log_dir", getattr(cfg, "log_dir", None))):
        problem = output_dir_problem(folder, flag) if folder else None
        if problem:
            raise ValueError(problem)


# option -> smallest allowed value
AT_LEAST = {
    "batch_size": 1,
    "accum_iter": 1,
    "epochs": 1,
    "warmup_epochs": 0,
    "num_workers": 0,
    "rep_aug": 0,
    "weight_decay": 0.0,
    "mixup": 0.0,
    "cutmix": 0.0,
    "input_size": 32,  # the features are at stride 32
    "min_lr": 0.0,
    "save_every_steps": 0,
}
UNIT_INTERVAL = ("reprob", "mixup_prob", "mixup_switch_prob")  # [0, 1]
HALF_OPEN = ("smoothing", "drop_path", "ema")  # [0, 1)


def common_problems(cfg: Any) -> list[str]:
    """What `finetune` and `probe` both require (besides numbers in range): a data path, a mapping."""
    problems = []
    if not cfg.data_path:
        problems.append("--data_path is required (a folder holding train/ and val/)")
    if not isinstance(cfg.model_kwargs, dict):
        problems.append(f"--model_kwargs {cfg.model_kwargs!r}: must be a mapping")
    return problems


def at_least_problems(cfg: Any, limits: dict[str, float]) -> list[str]:
    return [
        f"--{name} {getattr(cfg, name)}: must be >= {least}"
        for name, least in limits.items()
        if getattr(cfg, name) is not None and getattr(cfg, name) < least
    ]


def aa_problem(aa: str) -> str | None:
    """Why timm would fail mid-run with this RandAugment spec, or None.

    With increasing-severity ops (`inc1`), timm maps magnitude 10 to posterize with 0 bits, which
    Pillow >= 11 refuses ("bits must be between or equal to 1 and 8"); a magnitude noise (`mstd`)
    reaches 10 at random. `mmax9` caps the magnitude at 9 (1 bit), so a run cannot hit it.
    """
    parts = aa.split("-")
    if parts[0] != "rand" or "inc1" not in parts or any(p.startswith("mmax") for p in parts):
        return None
    from PIL import Image, ImageOps

    try:
        ImageOps.posterize(Image.new("RGB", (1, 1)), 0)
    except ValueError:
        return f"--aa {aa}: this Pillow refuses timm's posterize at magnitude 10; add -mmax9 ({aa}-mmax9)"
    return None


def validate(cfg: FinetuneConfig) -> FinetuneConfig:
    """Reject impossible values now, in one line naming each."""
    wrong_type = type_problems(cfg)
    if wrong_type:
        raise ValueError("invalid option(s): " + "; ".join(wrong_type))
    problems = common_problems(cfg) + at_least_problems(cfg, AT_LEAST)
    problems += [
        f"--{name} {getattr(cfg, name)}: must be in [0, 1]"
        for name in UNIT_INTERVAL
        if not 0.0 <= getattr(cfg, name) <= 1.0
    ]
    problems += [
        f"--{name} {getattr(cfg, name)}: must be in [0, 1)"
        for name in HALF_OPEN
        if not 0.0 <= getattr(cfg, name) < 1.0
    ]
    if not 0.0 < cfg.crop_pct <= 1.0:
        problems.append(f"--crop_pct {cfg.crop_pct}: must be in (0, 1]")
    aa = aa_problem(cfg.aa)
    if aa:
        problems.append(aa)
    mixing = cfg.mixup_prob > 0 and (cfg.mixup > 0 or cfg.cutmix > 0)
    if mixing and cfg.batch_size % 2:
        problems.append(f"--batch_size {cfg.batch_size}: Mixup/CutMix pair images, so it must be even")
    if not 0.0 < cfg.layer_decay <= 1.0:
        problems.append(f"--layer_decay {cfg.layer_decay}: must be in (0, 1] (1: off)")
    problems += [
        f"--{name} {getattr(cfg, name)}: must be > 0"
        for name in ("blr", "lr", "clip_grad")
        if getattr(cfg, name) is not None and getattr(cfg, name) <= 0
    ]
    if cfg.warmup_epochs >= cfg.epochs and cfg.epochs >= 1:
        problems.append(f"--warmup_epochs {cfg.warmup_epochs}: must be below --epochs {cfg.epochs}")
    from timm.optim import list_optimizers

    if cfg.opt not in list_optimizers():
        problems.append(f"--opt {cfg.opt}: not a timm optimiser (e.g. lamb, adamw, sgd, lars)")
    if problems:
        raise ValueError("invalid option(s): " + "; ".join(problems))
    return cfg
