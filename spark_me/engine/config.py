"""Pretraining configuration: MAE-style flags, an optional YAML file, SparK's recipe as defaults.

Precedence: command-line flag > YAML file > preset > SparK recipe default. Two presets:

- `spark`: the paper's recipe (ResNet-50, 224 px, blr 2e-4, 1600 epochs, 40 of them warmup), meant
  for ImageNet-scale data; the default whenever `--data_path` is given. It stays the default there
  because it is the recipe this project reproduces and the only one known to work at scale: the
  demo's base lr (0.15, 750x SparK's) was tuned at batch 8 on 12 photographs, and at SparK's batch
  of 4096 it would mean an lr of 2.4. Short runs of it still train: its warmup scales with `--epochs`.
- `demo`: the zero-argument run: 12 of the 16 embedded photographs (4 held out for the validation
  loss), ResNet-18 at 96 px, a few minutes on 2 CPU cores; with `--data_path` it is the quick look
  at one's own small folder (`--preset demo --data_path imgs`).

Warmup: unless `--warmup_epochs` is given, it is the preset's share of its own run (SparK: 40 of
1600 epochs = 2.5 %; demo: 2 of 24) applied to a shorter `--epochs` (`resolved_warmup`), and the
run keeps at least one optimiser step after it. Impossible values are rejected here, before any
data or model is touched.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spark_me.cli_parser import OneLineErrorParser
from spark_me.engine.config_input import output_dir_problem, read_config_file, yaml_mapping
from spark_me.masking import PATCH, keep_count

MAX_WORKERS = 8  # data-loader processes by default, at most (one per available core below that)
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")  # --compile_backend: code generation, or tracing only


def default_workers() -> int:
    """Data-loader processes: one per core this process may use (several processes on one node
    under torchrun share them), at most MAX_WORKERS; more would only contend for the same cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_process = cores // max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    return max(0, min(per_process, MAX_WORKERS))


@dataclass
class PretrainConfig:
    # model
    arch: str = "resnet50"
    model_kwargs: dict = field(default_factory=dict)  # architecture-shaping kwargs (depths, dims, ...)
    model: str | None = None  # "package.module:factory" building one's own nn.Module (instead of --arch)
    stages: list[str] | None = None  # its stride 4/8/16/32 stage modules (default: its feature_info)
    drop_path: float | None = None  # None: SparK's per-arch default
    decoder_width: int = 768
    mask_ratio: float = 0.6
    input_size: int = 224
    # data
    data_path: str | None = None
    num_workers: int = field(default_factory=default_workers)  # the cores available, capped
    repeat: int = 1  # each epoch shows every image this many times (fresh crop and mask each time)
    val_path: str | None = None  # held-out images; None: the held-out photographs when data_path is None
    val_every: int = 1  # epochs between validation losses (0: never)
    # optimisation (SparK recipe)
    batch_size: int = 32  # per GPU / process
    accum_iter: int = 1
    epochs: int = 1600
    warmup_epochs: float | None = None  # None: the preset's warmup share of its run (resolved_warmup)
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
    sync_bn: bool = True  # under DDP: BN statistics over all processes (encoder, densify, decoder)
    dataflow: str = "auto"  # sparse ops: auto (measured per layer) | rules | block | dense | gemm | me
    compile: bool = False  # torch.compile the dense stages (fill, projections, decoder, loss)
    compile_backend: str = "inductor"  # inductor | aot_eager | eager (the last two: debugging)
    # bookkeeping
    output_dir: str = "output"
    log_dir: str | None = None  # tensorboard; default: output_dir/tb
    save_every: int = 50  # also keep checkpoint-{epoch}.pth every N epochs (0: only checkpoint-last)
    save_every_steps: int = 0  # also checkpoint-mid-epoch.pth every N optimiser steps (0: never)
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
    # SparK's recipe: the dataclass defaults above
    "spark": {},
    # the zero-argument run: 12 photographs (4 more held out), a ResNet-18 at 96 px, 576 steps of 8
    # crops, about 5 min on 2 CPU cores; its masked-patch loss falls from 1.0 (patch means) to ~0.65
    "demo": dict(
        arch="resnet18",
        input_size=96,
        batch_size=8,
        repeat=16,  # 24 steps an epoch
        epochs=24,
        blr=0.15,
        decoder_width=256,
        num_workers=0,
        save_every=0,  # checkpoint-last.pth and timm-last.pth only
        recon_every=4,
    ),
}
# preset -> (warmup epochs, of run epochs): the warmup share that a shorter --epochs keeps
RECIPE_WARMUP = {"spark": (40, 1600), "demo": (2, 24)}


# what a default that is None or computed means, for --help
DEFAULT_MEANS = {
    "preset": "spark with --data_path, else demo",
    "drop_path": "SparK's per arch: " + ", ".join(f"{a} {r}" for a, r in DROP_PATH.items()) + ", others 0",
    "data_path": "the embedded photographs",
    "num_workers": f"the cores available, at most {MAX_WORKERS}",
    "val_path": "the held-out embedded photographs without --data_path, else none",
    "warmup_epochs": "the preset's share of its run (SparK 40 of 1600 epochs, demo 2 of 24) "
    "applied to --epochs, at most the preset's own",
    "lr": "from --blr",
    "min_lr": "lr x 0.001",
    "log_dir": "output_dir/tb",
    "device": "cuda when available, else cpu",
    "resume": "none",
    "init_weight": "none",
    "model_kwargs": "none",
}


def describe_default(name: str) -> str:
    """`--help`'s default of option `name`: SparK's (the dataclass) and the demo preset's if it differs."""
    fields = {f.name: f for f in dataclasses.fields(PretrainConfig)}
    base = fields[name].default
    if base is dataclasses.MISSING:
        base = fields[name].default_factory()  # type: ignore[misc]
    text = DEFAULT_MEANS.get(name) or str(base)
    demo = PRESETS["demo"].get(name)
    if demo is not None and demo != base:
        text += f"; demo: {demo}"
    return text


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        prog="spark-me pretrain",
        description="SparK pretraining on sparse tensors. Defaults: SparK's recipe (preset 'spark'); "
        "the 'demo' preset's value is shown where it differs.",
    )
    add = p.add_argument
    add("--config", type=Path, help="YAML file with any of the options below (flags override it)")
    add(
        "--preset",
        choices=sorted(PRESETS),
        help="named option set: 'spark' = the paper's recipe for ImageNet-scale data; 'demo' = a "
        "ResNet-18 at 96 px for a few minutes on a CPU (the embedded photographs or a small folder)",
    )
    add(
        "--arch", help="encoder: a spark-me or timm CNN name, e.g. resnet50, convnextv2_tiny, efficientnet_b0"
    )
    add(
        "--model",
        help="one's own CNN instead of --arch: 'package.module:factory', a function returning the "
        "nn.Module (called with --model_kwargs; the package must be importable)",
    )
    add(
        "--stages",
        type=lambda s: [p for p in s.split(",") if p],
        help="comma-separated names of the stride 4,8,16,32 stage modules (default: feature_info)",
    )
    add(
        "--model_kwargs",
        type=yaml_mapping,
        help="YAML mapping of encoder kwargs, e.g. '{depths: [1,1,3,1]}'",
    )
    add("--drop_path", type=float, help="stochastic depth rate of the encoder")
    add("--decoder_width", type=int, help="channels of the decoder's first block (halved at each)")
    add("--mask_ratio", type=float, help="share of 32x32 patches hidden from the encoder")
    add("--input_size", type=int, help="crop size, a multiple of 32")
    add("--data_path", help="folder of images (flat or ImageFolder tree)")
    add("--num_workers", type=int, help="data-loader processes")
    add(
        "--repeat",
        type=int,
        help="show each image N times per epoch, each with its own crop and mask: for small folders, "
        "so that an epoch (log line, validation, checkpoint) is more than a step or two",
    )
    add("--val_path", help="folder of held-out images for the validation loss (centre crops, fixed masks)")
    add("--val_every", type=int, help="epochs between validation losses (0: no validation)")
    add("--batch_size", type=int, help="per GPU / process")
    add(
        "--accum_iter",
        type=int,
        help="micro-batches per optimiser step; when it does not divide the batches of an epoch, "
        "the last (batches %% accum_iter) of each epoch are dropped (no update from a partial group)",
    )
    add("--epochs", type=int, help="passes over the data")
    add("--warmup_epochs", type=float, help="epochs of linear lr warmup (fractions allowed)")
    add("--blr", type=float, help="base lr: lr = blr * batch_size * accum_iter * world_size / 256")
    add("--lr", type=float, help="absolute lr (overrides --blr)")
    add("--min_lr", type=float, help="final lr of the cosine")
    add("--weight_decay", type=float, help="weight decay at the start (cosine ramp)")
    add("--weight_decay_end", type=float, help="weight decay at the end")
    add("--clip_grad", type=float, help="global gradient-norm clip inside LAMB (0: none)")
    add(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="mixed precision: the sparse encoder's kernels, densify projections and decoder in "
        "--amp_dtype (the 'me' dataflow stays float32)",
    )
    add("--amp_dtype", choices=("bf16", "fp16"), help="autocast dtype with --amp")
    add(
        "--sync_bn",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="under DDP, BatchNorm statistics over the visible sites of all processes (SparK's default)",
    )
    add(
        "--dataflow",
        choices=("auto", "rules", "block", "dense", "gemm", "fused", "me"),
        help="how sparse convs are computed: auto measures each layer's fastest dataflow at its first "
        "use (cached in output_dir/dataflows.json); 'me' is MinkowskiEngine's own (float32) function",
    )
    add(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the dense stages (mask-token fill and projections, decoder, loss); the "
        "sparse encoder stays eager. Compiles at the first step (its seconds are logged) and not "
        "again for new masks. Off by default: on CPUs it did not pay everywhere (README); measure "
        "with python -m benchmarks.compiled_step",
    )
    add(
        "--compile_backend",
        choices=COMPILE_BACKENDS,
        help="torch.compile backend with --compile: inductor (C++/OpenMP on CPUs, Triton on GPUs); "
        "aot_eager and eager trace without generating code (to debug)",
    )
    add("--output_dir", help="checkpoints, exports, logs, pictures")
    add("--log_dir", help="tensorboard folder")
    add("--save_every", type=int, help="keep checkpoint-NNNN.pth every N epochs (0: checkpoint-last only)")
    add(
        "--save_every_steps",
        type=int,
        help="also save checkpoint-mid-epoch.pth every N optimiser steps, to resume mid-epoch (for "
        "clusters that kill jobs without SIGTERM/SIGUSR1 first; 0: only on those signals)",
    )
    add("--keep_last", type=int, help="numbered checkpoints kept (0: all)")
    add("--resume", help="full checkpoint to continue from (model, optimiser, schedule, epoch)")
    add("--auto_resume", action=argparse.BooleanOptionalAction, default=None, help="resume from output_dir")
    add("--init_weight", help="encoder weights only (timm or sparse layout); training starts at epoch 0")
    add("--seed", type=int, help="seed of weights, crops and masks")
    add("--device", help="torch device")
    add("--recon_every", type=int, help="epochs between reconstruction pictures")
    for action in p._actions:  # every option's default, as resolve() would fill it in
        if action.dest in {f.name for f in dataclasses.fields(PretrainConfig)}:
            action.help = f"{action.help or ''} (default: {describe_default(action.dest)})".lstrip()
    return p


def resolve(argv: list[str] | None = None) -> PretrainConfig:
    args = build_parser().parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None and k != "config"}
    from_file: dict[str, Any] = {}
    if args.config:
        from_file = read_config_file(args.config)
        unknown = set(from_file) - {f.name for f in dataclasses.fields(PretrainConfig)}
        if unknown:
            raise ValueError(f"unknown option(s) in {args.config}: {', '.join(sorted(map(str, unknown)))}")
        from_file = read_yaml_floats(from_file)
    merged = {**from_file, **given}
    preset = merged.get("preset") or ("spark" if merged.get("data_path") else "demo")
    values = {**PRESETS[preset], **merged, "preset": preset}
    if values.get("betas") is not None:
        values["betas"] = tuple(values["betas"])
    cfg = validate(PretrainConfig(**values))
    for flag, folder in (("--output_dir", cfg.output_dir), ("--log_dir", cfg.log_dir)):
        problem = output_dir_problem(folder, flag) if folder else None  # the filesystem: not in validate()
        if problem:
            raise ValueError(problem)
    return cfg


def resolved_warmup(cfg: PretrainConfig) -> tuple[float, str]:
    """(warmup epochs, why): `--warmup_epochs` when given, else the preset's warmup share of its
    run applied to `--epochs`, never more than the preset's own warmup. A recipe's 40 warmup epochs
    would otherwise swallow a 2-epoch run whole, leaving the lr at 1e-8 throughout."""
    if cfg.warmup_epochs is not None:
        return float(cfg.warmup_epochs), "--warmup_epochs"
    preset = cfg.preset if cfg.preset in RECIPE_WARMUP else "spark"
    warmup, of_epochs = RECIPE_WARMUP[preset]
    if cfg.epochs >= of_epochs:
        return float(warmup), f"the {preset} recipe's {warmup} epochs"
    scaled = warmup * cfg.epochs / of_epochs
    return scaled, f"the {preset} recipe's {warmup} of {of_epochs} epochs, scaled to {cfg.epochs} epochs"


def read_yaml_floats(values: dict[str, Any]) -> dict[str, Any]:
    """PyYAML follows YAML 1.1, where `1e-3` (no dot) is a string, not a number; a user who writes
    `lr: 1e-3` means the number, so float options take any string that Python reads as a float."""
    floats = {f.name for f in dataclasses.fields(PretrainConfig) if f.type.startswith("float")}
    out = dict(values)
    for name in floats & set(values):
        if isinstance(values[name], str):
            with contextlib.suppress(ValueError):  # else left as it is: type_problems names it
                out[name] = float(values[name])
    return out


# option -> smallest allowed value; checked when the config is read, before any model or data
AT_LEAST = {
    "batch_size": 1,
    "accum_iter": 1,
    "epochs": 1,
    "save_every": 0,
    "save_every_steps": 0,
    "repeat": 1,
    "recon_every": 1,
    "warmup_epochs": 0,
    "num_workers": 0,
    "keep_last": 0,
    "val_every": 0,
    "weight_decay": 0.0,
    "weight_decay_end": 0.0,
    "clip_grad": 0.0,
    "min_lr": 0.0,
}
ABOVE_ZERO = ("blr", "lr")


def size_problem(name: str, size: int) -> str | None:
    """Why `size` cannot be a SparK image size or decoder width (positive, a multiple of 32), or None."""
    if size <= 0 or size % PATCH:
        return (
            f"--{name} {size}: must be a positive multiple of {PATCH} (SparK masks {PATCH}x{PATCH} patches)"
        )
    return None


def mask_ratio_problem(mask_ratio: float, input_size: int) -> str | None:
    """Why `mask_ratio` is unusable at `input_size`, or None (in [0, 1), keeping at least one cell)."""
    grid = max(input_size // PATCH, 1)
    try:
        keep_count(grid, grid, mask_ratio)
    except ValueError as err:
        return f"--mask_ratio {mask_ratio}: {err}"
    return None


def type_problems(cfg: PretrainConfig) -> list[str]:
    """Numeric options that hold something else (a YAML file can put a string anywhere)."""
    problems = []
    for f in dataclasses.fields(cfg):
        base, value = f.type.removesuffix(" | None"), getattr(cfg, f.name)
        if base not in ("int", "float") or (value is None and f.type.endswith("None")):
            continue
        kinds = int if base == "int" else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            problems.append(f"--{f.name} {value!r}: must be {'an integer' if base == 'int' else 'a number'}")
    return problems


def validate(cfg: PretrainConfig) -> PretrainConfig:
    """Reject impossible values now, in one line naming each, instead of deep inside the run
    (after the data was indexed and the model built) or, worse, a silently odd run."""
    wrong_type = type_problems(cfg)
    if wrong_type:
        raise ValueError("invalid option(s): " + "; ".join(wrong_type))
    problems = [
        f"--{name} {getattr(cfg, name)}: must be >= {least}"
        for name, least in AT_LEAST.items()
        if getattr(cfg, name) is not None and getattr(cfg, name) < least
    ]
    problems += [
        f"--{name} {getattr(cfg, name)}: must be > 0"
        for name in ABOVE_ZERO
        if getattr(cfg, name) is not None and getattr(cfg, name) <= 0
    ]
    if cfg.compile_backend not in COMPILE_BACKENDS:  # a YAML file bypasses argparse's choices
        problems.append(
            f"--compile_backend {cfg.compile_backend!r}: must be one of {', '.join(COMPILE_BACKENDS)}"
        )
    if cfg.drop_path is not None and not 0.0 <= cfg.drop_path < 1.0:
        problems.append(f"--drop_path {cfg.drop_path}: must be in [0, 1)")
    problems += [
        problem
        for problem in (
            size_problem("input_size", cfg.input_size),
            size_problem("decoder_width", cfg.decoder_width),
            mask_ratio_problem(cfg.mask_ratio, cfg.input_size),
        )
        if problem
    ]
    if problems:
        raise ValueError("invalid option(s): " + "; ".join(problems))
    return cfg
