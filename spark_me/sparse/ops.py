"""What a sparse layer computes, independent of how (dataflows.py) and of who chooses (tuner.py)."""

from __future__ import annotations

from functools import cached_property

import MinkowskiEngine as ME
import torch
from torch import Tensor


class SparseOp:
    """What a layer computes: a `kind` ("conv", "depthwise", "maxpool") with kernel, stride, widths."""

    def __init__(self, kind: str, kernel_size: int, stride: int, in_channels: int, out_channels: int):
        if kind not in ("conv", "depthwise", "maxpool"):
            raise ValueError(f"unknown sparse op {kind!r}")
        self.kind, self.kernel_size, self.stride = kind, kernel_size, stride
        self.in_channels, self.out_channels = in_channels, out_channels

    @property
    def signature(self) -> tuple:
        return (self.kind, self.kernel_size, self.stride, self.in_channels, self.out_channels)

    @property
    def halo(self) -> int:
        """Sites each block grows by: odd kernels are centred (padding k//2), even ones span 0..k-1."""
        return self.kernel_size // 2 if self.kernel_size % 2 else 0

    @property
    def groups(self) -> int:
        return self.in_channels if self.kind == "depthwise" else 1

    @property
    def fill(self) -> float:
        """What masked sites hold for this op: 0 for convs, -inf for max-pool (max over visible sites)."""
        return float("-inf") if self.kind == "maxpool" else 0.0

    @cached_property
    def kernel_generator(self) -> ME.KernelGenerator:
        return ME.KernelGenerator(kernel_size=self.kernel_size, stride=self.stride, dimension=2)

    def __repr__(self) -> str:
        k = self.kernel_size
        return f"{self.kind}{k}x{k}/{self.stride} {self.in_channels}->{self.out_channels}"


def compute_dtype(feats: Tensor, op: SparseOp) -> torch.dtype:
    """The dtype a dense kernel would run in here: autocast's for convs, else the features' own."""
    device = feats.device.type
    if op.kind != "maxpool" and feats.is_floating_point() and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return feats.dtype
