"""What a sparse layer computes, independent of how (dataflows.py) and of who chooses (tuner.py)."""

from __future__ import annotations

from functools import cached_property

import MinkowskiEngine as ME
import torch
from torch import Tensor

KINDS = ("conv", "depthwise", "maxpool", "avgpool")
POOLS = ("maxpool", "avgpool")


class SparseOp:
    """What a layer computes: a `kind` with kernel, stride and widths.

    kinds: "conv" (dense or grouped: `groups` divides both widths), "depthwise" (groups == channels,
    one k x k filter per channel), "maxpool" (masked sites never win), "avgpool" (masked sites read
    as zeros; `count_include_pad` as torch's: whether out-of-image padding counts in the divisor).
    """

    def __init__(
        self,
        kind: str,
        kernel_size: int,
        stride: int,
        in_channels: int,
        out_channels: int,
        groups: int = 1,
        count_include_pad: bool = True,
    ):
        if kind not in KINDS:
            raise ValueError(f"unknown sparse op {kind!r}")
        if kind == "conv" and (in_channels % groups or out_channels % groups):
            raise ValueError(f"groups {groups} must divide the widths {in_channels} -> {out_channels}")
        self.kind, self.kernel_size, self.stride = kind, kernel_size, stride
        self.in_channels, self.out_channels = in_channels, out_channels
        self._groups = groups if kind == "conv" else 1
        self.count_include_pad = count_include_pad if kind == "avgpool" else True

    @property
    def signature(self) -> tuple:
        return (self.kind, self.kernel_size, self.stride, self.in_channels, self.out_channels, self.groups)

    @property
    def halo(self) -> int:
        """Sites each block grows by: odd kernels are centred (padding k//2), even ones span 0..k-1."""
        return self.kernel_size // 2 if self.kernel_size % 2 else 0

    @property
    def groups(self) -> int:
        return self.in_channels if self.kind == "depthwise" else self._groups

    @property
    def weighted(self) -> bool:
        """Convolutions have a weight (and a custom backward); pools run on plain autograd."""
        return self.kind not in POOLS

    @property
    def fill(self) -> float:
        """What masked sites hold for this op: -inf for max-pool (max over visible sites), else 0."""
        return float("-inf") if self.kind == "maxpool" else 0.0

    @cached_property
    def kernel_generator(self) -> ME.KernelGenerator:
        return ME.KernelGenerator(kernel_size=self.kernel_size, stride=self.stride, dimension=2)

    def __repr__(self) -> str:
        k = self.kernel_size
        groups = f" g{self.groups}" if self.kind == "conv" and self.groups > 1 else ""
        pad = " excl-pad" if not self.count_include_pad else ""
        return f"{self.kind}{k}x{k}/{self.stride} {self.in_channels}->{self.out_channels}{groups}{pad}"


def compute_dtype(feats: Tensor, op: SparseOp) -> torch.dtype:
    """The dtype a dense kernel would run in here: autocast's for convs, else the features' own."""
    device = feats.device.type
    if op.weighted and feats.is_floating_point() and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return feats.dtype
