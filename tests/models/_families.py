"""The timm CNN families of issue 19, in the smallest configurations that keep every op kind.

Shared by the oracle's own tests (test_masked_dense.py) and the generic sparse path's family matrix
(test_generic.py). Kwargs only shrink depth (blocks per stage); every kind of block, stem,
downsample, squeeze-excite, concatenation and norm of the family stays. CSPDarkNet and RepVGG take
no depth kwarg, so their timm class is built from timm's own config with fewer blocks per stage.
Models whose factory fixes its multipliers (EfficientNet, MobileNet, GhostNet) and RegNet (whose
stages come from its depth) run full size: at 64x96 px they cost a few tenths of a second.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import timm
import torch
from timm.models import byobnet, cspnet
from torch import nn

from .._fixtures import randomize


def _cspdarknet53_small(**kwargs) -> nn.Module:
    """One dark block per stage (timm's has 1, 2, 8, 8, 4): still split, cat, transition convs."""
    cfg = cspnet.model_cfgs["cspdarknet53"]
    cfg = dataclasses.replace(cfg, stages=dataclasses.replace(cfg.stages, depth=(1, 1, 1, 1, 1)))
    return cspnet.CspNet(cfg=cfg, **kwargs)


def _repvgg_a2_small(**kwargs) -> nn.Module:
    """Blocks per stage 1, 2, 1, 1 (timm's 2, 4, 14, 1): the second block of stage 2 has the
    BN-identity branch beside the 3x3 and 1x1 ones."""
    cfg = byobnet.model_cfgs["repvgg_a2"]
    blocks = tuple(dataclasses.replace(b, d=n) for b, n in zip(cfg.blocks, (1, 2, 1, 1), strict=True))
    return byobnet.ByobNet(cfg=dataclasses.replace(cfg, blocks=blocks), **kwargs)


# name -> timm kwargs, or a factory building timm's class from a smaller timm config
FAMILIES: dict[str, dict | Callable[..., nn.Module]] = {
    # ResNet-D: deep stem, avg-pool shortcut (stride > 1 stages), bottlenecks
    "resnet50d": dict(layers=(1, 1, 1, 1)),
    "resnext50_32x4d": dict(layers=(1, 1, 1, 1)),  # grouped 3x3
    "seresnext50_32x4d": dict(layers=(1, 1, 1, 1)),  # + squeeze-excite (mean, sigmoid, mul)
    "resnet50": dict(layers=(1, 2, 1, 1)),  # a block with an identity shortcut too
    "regnetx_016": {},
    "regnety_016": {},  # + squeeze-excite
    "efficientnet_b0": {},  # depthwise 3x3/5x5 s2, BatchNormAct2d SiLU, SE, residual adds
    "efficientnet_lite0": {},  # ReLU6 (hardtanh), no SE
    "mobilenetv2_100": {},
    "mobilenetv3_large_100": {},  # hardswish, hardsigmoid SE
    "densenet121": dict(block_config=(2, 2, 2, 2)),  # cat, BN-act-conv, avg-pool transitions
    "cspdarknet53": _cspdarknet53_small,  # split, cat, leaky ReLU
    "dla34": {},  # trees: cat roots, max-pool downsampling
    "ghostnet_100": {},  # cat + channel slicing, SE with hard sigmoid
    "repvgg_a2": _repvgg_a2_small,  # parallel 3x3 / 1x1 / BN-identity branches added
    "convnext_atto": dict(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32)),  # LayerNorm2d, conv MLP, layer scale
    "convnextv2_atto": dict(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32)),  # + GRN (norms over H, W)
}


def build(name: str, gen: torch.Generator) -> nn.Module:
    """timm's `name` (no classifier) with random non-trivial norms (see `randomize`), float64."""
    config = FAMILIES[name]
    if callable(config):
        model = config(num_classes=0)
    else:
        model = timm.create_model(name, pretrained=False, num_classes=0, **config)
    randomize(model, gen)
    return model.double()


# Train-mode BN over the few sites of a stride-32 map amplifies float64 rounding: the masked-dense
# oracle compared with itself on the reversed batch (same maths, another summation order; or 2
# threads instead of 1) differs by up to 7e-9 in gradients for the ReLU6 families, whose BNs see
# channels that ReLU6 left nearly constant. Every other family and every eval check: 1e-10.
TRAIN_TOL = {"efficientnet_lite0": 1e-8, "mobilenetv2_100": 1e-8}
