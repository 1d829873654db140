"""SparK's fine-tuning optimiser: AdamW with layer-wise lr decay over the backbone's depth.

Pretrained early layers move less than new heads: depth level 0 (stem) gets `decay**6`, the four
stages 1..5 (the third stage split in halves, it holds most blocks), FPN and heads get 1. With
decay 0.6: stem 0.047, res2 0.078, res3 0.13, res4 0.216 / 0.36, res5 0.6 (SparK's multipliers).
"""

from __future__ import annotations

import re

import torch
from detectron2.config import CfgNode
from detectron2.solver import build_optimizer as build_default_optimizer
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from torch import nn

NUM_LEVELS = 6  # stem, res2, res3, res4 (two halves), res5


def depth_level(name: str, stage3_blocks: int) -> int:
    """0 (stem) .. 5 (last stage) for backbone parameters, NUM_LEVELS for FPN, heads and output norms."""
    name = name.removeprefix("backbone.bottom_up.").removeprefix("model.")
    if name.startswith("stem"):
        return 0
    stage, block = None, None
    if m := re.match(r"res(\d)\.(\d+)\.", name):  # Detectron2 ResNet: res2..res5
        stage, block = int(m[1]) - 2, int(m[2])
    elif m := re.match(r"stages\.(\d)\.(?:blocks\.(\d+)\.)?", name):  # timm ConvNeXt
        stage, block = int(m[1]), int(m[2]) if m[2] is not None else 0
    if stage is None:
        return NUM_LEVELS
    if stage < 2:
        return stage + 1
    if stage == 2:
        return 3 if block < (stage3_blocks + 1) // 2 else 4
    return 5


def _stage3_blocks(model: nn.Module) -> int:
    names = [n for n, _ in model.named_parameters()]
    blocks = {int(m[1]) for n in names if (m := re.search(r"(?:res4|stages\.2\.blocks)\.(\d+)\.", n))}
    return len(blocks) or 1


def build_optimizer(cfg: CfgNode, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW + layer decay when `SOLVER.OPTIMIZER: AdamW`; Detectron2's SGD otherwise."""
    if cfg.SOLVER.OPTIMIZER.lower() == "sgd":
        return build_default_optimizer(cfg, model)
    if cfg.SOLVER.OPTIMIZER.lower() != "adamw":
        raise ValueError(f"SOLVER.OPTIMIZER must be SGD or AdamW, not {cfg.SOLVER.OPTIMIZER!r}")
    decay, blocks = cfg.SOLVER.LAYER_DECAY, _stage3_blocks(model)
    params = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        lr_factor_func=lambda name: decay ** (NUM_LEVELS - depth_level(name, blocks)),
    )
    return maybe_add_gradient_clipping(cfg, torch.optim.AdamW)(params, lr=cfg.SOLVER.BASE_LR)
