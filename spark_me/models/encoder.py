"""What every sparse encoder provides: the dense-in/dense-out contract around a sparse forward."""

from __future__ import annotations

import MinkowskiEngine as ME
import torch
from torch import Tensor, nn

from spark_me.sparse.tensor import densify, sparsify

STRIDES = (4, 8, 16, 32)
PATCH = 32  # the mask grid is the stride-32 grid


def check_mask(images: Tensor, active: Tensor) -> None:
    """Images [B, 3, H, W] with H, W multiples of 32; mask [B, H/32, W/32] with >= 1 cell kept per image."""
    if images.dim() != 4:
        raise ValueError(f"expected images [B, C, H, W], got shape {tuple(images.shape)}")
    batch, _, height, width = images.shape
    if height % PATCH or width % PATCH:
        raise ValueError(f"image size {height}x{width} is not a multiple of {PATCH}; resize or crop it")
    expected = (batch, height // PATCH, width // PATCH)
    if tuple(active.shape) != expected:
        raise ValueError(f"mask shape {tuple(active.shape)} != {expected} (the stride-{PATCH} grid)")
    if not bool(active.flatten(1).any(1).all()):
        raise ValueError("every image needs at least one visible cell")


class SparseEncoder(nn.Module):
    """Subclasses implement `forward_sparse`; `channels` are the widths at strides 4, 8, 16, 32.

    ME has float32/float64 kernels only, so the encoder always runs in float32 (autocast is turned
    off inside, whatever the caller uses).
    """

    channels: tuple[int, int, int, int]
    strides = STRIDES

    def forward_sparse(self, x: ME.SparseTensor) -> list[ME.SparseTensor]:
        raise NotImplementedError

    @property
    def me_dtype(self) -> torch.dtype:
        """float32, or float64 if the encoder was converted with .double() (ME has nothing else)."""
        dtype = next(self.parameters()).dtype
        return dtype if dtype in (torch.float32, torch.float64) else torch.float32

    def forward(self, images: Tensor, active: Tensor) -> list[Tensor]:
        """images [B, 3, H, W], active [B, H/32, W/32] -> 4 maps [B, C_i, H/s_i, W/s_i], 0 at masked sites."""
        check_mask(images, active)
        batch, _, height, width = images.shape
        with torch.autocast(images.device.type, enabled=False):
            feats = self.forward_sparse(sparsify(images.to(self.me_dtype), active))
        return [
            densify(f, (batch, c, height // s, width // s))
            for f, c, s in zip(feats, self.channels, self.strides, strict=True)
        ]
