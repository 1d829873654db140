"""SparK's random patch mask on the stride-32 grid."""

from __future__ import annotations

import torch
from torch import Tensor

PATCH = 32


def keep_count(grid_h: int, grid_w: int, mask_ratio: float) -> int:
    """Cells kept per image: round(h * w * (1 - mask_ratio)), the same in every image."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {mask_ratio}")
    keep = round(grid_h * grid_w * (1.0 - mask_ratio))
    if keep < 1:
        raise ValueError(
            f"mask ratio {mask_ratio} keeps no cell of a {grid_h}x{grid_w} grid; "
            "lower it or use larger images"
        )
    return keep


def random_mask(
    batch: int,
    height: int,
    width: int,
    mask_ratio: float = 0.6,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Active (visible) cells [B, H/32, W/32] bool for images of size height x width.

    The cells kept are the `keep_count` smallest of uniform noise per image (argsort), so every image
    keeps the same number of cells.
    """
    if height % PATCH or width % PATCH:
        raise ValueError(f"image size {height}x{width} is not a multiple of {PATCH}; resize or crop it")
    grid_h, grid_w = height // PATCH, width // PATCH
    keep = keep_count(grid_h, grid_w, mask_ratio)
    noise_device = generator.device if generator is not None else device
    noise = torch.rand(batch, grid_h * grid_w, generator=generator, device=noise_device)
    kept = noise.argsort(dim=1)[:, :keep]
    active = torch.zeros(batch, grid_h * grid_w, dtype=torch.bool, device=noise.device)
    active.scatter_(1, kept, True)
    active = active.view(batch, grid_h, grid_w)
    return active.to(device) if device is not None else active
