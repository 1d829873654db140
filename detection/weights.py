"""Pretrained backbone weights into a Detectron2 model, exactly, with a report of every key.

Detectron2's own checkpointer matches names heuristically and only logs what it could not place; a
fine-tuning run that silently starts from random backbone weights is the costliest mistake in
transfer experiments. Here every backbone tensor must come from the file (or the load fails naming
the keys), and what stays at its initialisation (FPN, heads, new norms) is listed.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from converters import load_state, to_detectron2, to_timm
from converters.timm_format import HEAD, encoder_state

log = logging.getLogger("spark_me.detection")


@dataclass
class LoadReport:
    source: str
    loaded: int  # backbone tensors copied from the file
    initialised: dict[str, int] = field(default_factory=dict)  # module group -> tensors left at init

    def __str__(self) -> str:
        groups = ", ".join(f"{k} ({v})" for k, v in sorted(self.initialised.items())) or "-"
        return f"loaded {self.loaded} backbone tensors from {self.source}; initialised: {groups}"


def read_timm_state(path: str | Path) -> dict[str, torch.Tensor]:
    """timm-layout backbone weights from any spark-me output: a pretraining checkpoint (converted),
    a timm export (.pth/.safetensors) or a Detectron2 export (.pkl)."""
    checkpoint = load_state(path)
    config = checkpoint.get("config") if isinstance(checkpoint.get("config"), dict) else None
    if config and config.get("arch"):
        return to_timm(checkpoint, config["arch"], **dict(config.get("model_kwargs") or {}))
    return {k: v for k, v in encoder_state(checkpoint).items() if not HEAD.match(k)}


def backbone_prefix(model: nn.Module) -> str:
    """Where pretrained tensors go in the Detectron2 model's state_dict."""
    bottom_up = model.backbone.bottom_up
    return "backbone.bottom_up." + getattr(bottom_up, "pretrained_prefix", "")


def _group(key: str) -> str:
    parts = key.split(".")
    return ".".join(parts[:3] if parts[:2] == ["backbone", "bottom_up"] else parts[:2])


def load_pretrained_backbone(model: nn.Module, path: str | Path) -> LoadReport:
    """Copy the file's backbone into `model`; fail naming any missing, unexpected or mis-shaped key."""
    timm_state = read_timm_state(path)
    prefix = backbone_prefix(model)
    if prefix == "backbone.bottom_up.":  # Detectron2's ResNet: its own names
        if not any(k.startswith("layer1.") for k in timm_state):
            raise ValueError(f"{path} does not hold a ResNet (no 'layer1.*' keys) but the config builds one")
        named = {k: torch.as_tensor(v) for k, v in to_detectron2(timm_state)["model"].items()}
    else:
        named = timm_state
    incoming = {prefix + k: v for k, v in named.items()}
    own = model.state_dict()
    expected = {k for k in own if k.startswith(prefix) and not k.endswith("num_batches_tracked")}
    missing = sorted(expected - incoming.keys())
    unexpected = sorted(incoming.keys() - own.keys())
    shapes = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in incoming.items()
        if k in own and v.shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        lines = [
            f"{path} does not match the model's backbone ({model.backbone.bottom_up.__class__.__name__}):"
        ]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
            if keys:
                shown = ", ".join(keys[:12]) + (f", ... ({len(keys)} in all)" if len(keys) > 12 else "")
                lines.append(f"  {title}: {shown}")
        raise ValueError("\n".join(lines))
    model.load_state_dict({**own, **{k: v.to(own[k].dtype) for k, v in incoming.items()}})
    rest = Counter(_group(k) for k in own if k not in incoming and not k.endswith("num_batches_tracked"))
    report = LoadReport(str(path), len(incoming), dict(rest))
    log.info("%s", report)
    return report
