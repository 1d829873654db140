"""timm ResNet state_dict <-> Detectron2 backbone checkpoint (`.pkl`).

Detectron2's ResNet names: `stem.conv1`, `res2`..`res5` for timm's `layer1`..`layer4`, each conv's
BN as `convK.norm`, the projection shortcut as `shortcut` / `shortcut.norm`. Values are numpy
arrays in `{"model": ..., "__author__": ..., "matching_heuristics": True}`; with that flag
Detectron2's checkpointer also finds them under `backbone.bottom_up.` in an FPN model.

The config the weights need (torchvision/timm-style RGB input, ImageNet statistics in 0-255):
    MODEL.PIXEL_MEAN [123.675, 116.28, 103.53], MODEL.PIXEL_STD [58.395, 57.12, 57.375],
    INPUT.FORMAT "RGB", MODEL.RESNETS.STRIDE_IN_1X1 False (timm puts the stride on the 3x3 conv),
    MODEL.RESNETS.DEPTH matching the arch, and for ResNet-18/34 RES2_OUT_CHANNELS 64.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

import numpy as np
import torch

log = logging.getLogger(__name__)

DETECTRON2_CONFIG = {
    "MODEL.PIXEL_MEAN": [123.675, 116.28, 103.53],
    "MODEL.PIXEL_STD": [58.395, 57.12, 57.375],
    "INPUT.FORMAT": "RGB",
    "MODEL.RESNETS.STRIDE_IN_1X1": False,
}


def timm_to_detectron2_name(key: str) -> str | None:
    """One timm ResNet key -> its Detectron2 name (None: not part of the backbone)."""
    if key.endswith("num_batches_tracked") or key.startswith("fc."):
        return None
    if key == "conv1.weight":
        return "stem.conv1.weight"
    if m := re.fullmatch(r"bn1\.(\w+)", key):
        return f"stem.conv1.norm.{m[1]}"
    m = re.fullmatch(r"layer(\d)\.(\d+)\.(.+)", key)
    if not m:
        raise ValueError(f"not a timm ResNet key: {key}")
    stage, block, rest = f"res{int(m[1]) + 1}", m[2], m[3]
    if n := re.fullmatch(r"conv(\d)\.weight", rest):
        return f"{stage}.{block}.conv{n[1]}.weight"
    if n := re.fullmatch(r"bn(\d)\.(\w+)", rest):
        return f"{stage}.{block}.conv{n[1]}.norm.{n[2]}"
    if rest == "downsample.0.weight":
        return f"{stage}.{block}.shortcut.weight"
    if n := re.fullmatch(r"downsample\.1\.(\w+)", rest):
        return f"{stage}.{block}.shortcut.norm.{n[1]}"
    raise ValueError(f"no Detectron2 name for timm key: {key}")


def to_detectron2(timm_state_dict: Mapping[str, torch.Tensor]) -> dict:
    """timm ResNet state_dict -> Detectron2 checkpoint dict (pickle it to a `.pkl`)."""
    if not any(k.startswith("layer1.") for k in timm_state_dict):
        raise ValueError("Detectron2 export supports timm ResNets only (no 'layer1.*' keys found)")
    model = {}
    for key, value in timm_state_dict.items():
        name = timm_to_detectron2_name(key)
        if name is None:
            if not key.endswith("num_batches_tracked"):
                log.info("not exported to Detectron2: %s", key)
            continue
        model[name] = value.detach().cpu().numpy()
    return {"model": model, "__author__": "spark-me", "matching_heuristics": True}


def from_detectron2(checkpoint: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """The reverse, for Detectron2 ResNet backbones (e.g. to start pretraining from them)."""
    model = checkpoint.get("model", checkpoint)
    reverse = {}
    for key, value in model.items():
        key = key.removeprefix("backbone.bottom_up.")
        if key.startswith("stem.conv1.norm."):
            timm_key = "bn1." + key.rsplit(".", 1)[1]
        elif key == "stem.conv1.weight":
            timm_key = "conv1.weight"
        elif m := re.fullmatch(r"res(\d)\.(\d+)\.(.+)", key):
            layer, block, rest = f"layer{int(m[1]) - 1}", m[2], m[3]
            rest = re.sub(r"^conv(\d)\.norm\.", r"bn\1.", rest)
            rest = re.sub(r"^shortcut\.norm\.", "downsample.1.", rest)
            rest = rest.replace("shortcut.weight", "downsample.0.weight")
            timm_key = f"{layer}.{block}.{rest}"
        else:
            continue  # FPN, heads
        reverse[timm_key] = torch.as_tensor(np.asarray(value))
    return reverse
