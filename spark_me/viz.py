"""Reconstruction pictures: one row per image, columns input | masked | reconstruction | merged."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torchvision.utils import save_image

from spark_me.data.transforms import IMAGENET_MEAN, IMAGENET_STD


def denormalize(images: Tensor) -> Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() * std + mean).clamp(0, 1)


@torch.no_grad()
def reconstruction_grid(model, images: Tensor, active: Tensor | None = None) -> Tensor:
    """[B, 3, H, W] normalised images -> [4B, 3, H, W] pictures in [0, 1], masked cells shown grey."""
    out = model.reconstruct(images, active)
    grey = torch.full_like(out["input"], 0.5)
    masked = torch.where(out["visible"], denormalize(out["input"]), grey)
    rows = [denormalize(out["input"]), masked, denormalize(out["prediction"]), denormalize(out["merged"])]
    return torch.stack(rows, dim=1).flatten(0, 1)


def save_reconstructions(
    model, images: Tensor, path: Path, active: Tensor | None = None, min_side: int = 192
) -> Path:
    """Writes the grid as PNG; small crops (a 96-px demo) are enlarged, pixels kept square and sharp,
    to at least `min_side` px so that a person can see what the masked cells were filled with."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = reconstruction_grid(model, images, active)
    scale = -(-min_side // grid.shape[-1])
    if scale > 1:
        grid = torch.nn.functional.interpolate(grid, scale_factor=scale, mode="nearest")
    save_image(grid, path, nrow=4, padding=2, pad_value=1.0)
    return path
