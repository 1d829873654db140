"""Probe configuration: the data, size and batch options of `finetune`, plus the probe's own.

k-NN as in DINO / iBOT (cosine similarity, k = 20, votes weighted by exp(similarity / 0.07)); linear
probe as in MAE (BatchNorm without affine, eps 1e-6, then a linear layer; 90 epochs, blr 0.1, no
weight decay), trained here on features computed once from centre crops.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from spark_me.engine.config import type_problems
from spark_me.engine.finetune_config import (
    add_data_options,
    at_least_problems,
    common_problems,
    merge_options,
)


@dataclass
class ProbeConfig:
    arch: str = "resnet50"
    model_kwargs: dict = field(default_factory=dict)
    weights: str | None = None
    data_path: str | None = None
    input_size: int = 224
    crop_pct: float = 0.95
    batch_size: int = 128  # feature extraction and linear-probe batches
    num_workers: int = 8
    output_dir: str = "output-probe"
    seed: int = 0
    device: str | None = None
    method: str = "knn"  # knn | linear
    knn_k: int = 20
    knn_t: float = 0.07
    epochs: int = 90  # linear probe
    warmup_epochs: int = 10
    blr: float = 0.1  # lr = blr * batch_size / 256
    weight_decay: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spark-me probe",
        description="Frozen-feature probes of a backbone: k-NN or linear classifier on pooled stride-32 "
        "features, top-1 on val/.",
    )
    add_data_options(p)
    add = p.add_argument
    add("--method", choices=("knn", "linear"))
    add("--crop_pct", type=float, help="centre crop fraction (train and val features)")
    add("--knn_k", type=int, help="neighbours (k-NN)")
    add("--knn_t", type=float, help="temperature of the k-NN votes")
    add("--epochs", type=int, help="linear probe epochs")
    add("--warmup_epochs", type=int, help="linear probe warmup epochs")
    add("--blr", type=float, help="linear probe base lr: lr = blr * batch_size / 256")
    add("--weight_decay", type=float, help="linear probe weight decay")
    return p


AT_LEAST = {
    "batch_size": 1,
    "num_workers": 0,
    "input_size": 32,
    "knn_k": 1,
    "epochs": 1,
    "warmup_epochs": 0,
    "weight_decay": 0.0,
}


def resolve(argv: list[str] | None = None) -> ProbeConfig:
    cfg = ProbeConfig(**merge_options(build_parser().parse_args(argv), ProbeConfig))
    wrong_type = type_problems(cfg)
    if wrong_type:
        raise ValueError("invalid option(s): " + "; ".join(wrong_type))
    problems = common_problems(cfg) + at_least_problems(cfg, AT_LEAST)
    problems += [f"--{n} {getattr(cfg, n)}: must be > 0" for n in ("knn_t", "blr") if getattr(cfg, n) <= 0]
    if not 0.0 < cfg.crop_pct <= 1.0:
        problems.append(f"--crop_pct {cfg.crop_pct}: must be in (0, 1]")
    if cfg.method not in ("knn", "linear"):
        problems.append(f"--method {cfg.method}: must be knn or linear")
    if problems:
        raise ValueError("invalid option(s): " + "; ".join(problems))
    return cfg
