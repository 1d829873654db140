"""What every sparse encoder provides: the dense-in/dense-out contract around a sparse forward."""

from __future__ import annotations

import MinkowskiEngine as ME
from torch import Tensor, nn

from spark_me.sparse.layers import _TunedOp
from spark_me.sparse.tensor import densify, sparsify
from spark_me.sparse.tuner import DataflowTuner

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

    The encoder runs in the caller's precision: under autocast its convs and GEMMs run in bf16/fp16
    (every dataflow except MinkowskiEngine's own ``me``, which has float32/float64 kernels only
    and so runs in float32). Which dataflow each conv, depthwise conv and pool uses is decided by
    one `DataflowTuner` shared by all its layers (`set_dataflow`).
    """

    channels: tuple[int, int, int, int]
    strides = STRIDES
    tuner: DataflowTuner | None = None

    def forward_sparse(self, x: ME.SparseTensor) -> list[ME.SparseTensor]:
        raise NotImplementedError

    def set_dataflow(
        self, mode: str | DataflowTuner = "auto", cache_file: str | None = None
    ) -> DataflowTuner:
        """Give every sparse op one tuner: "auto" (measure at first use), "rules", or a dataflow name
        ("block", "dense", "gemm", "fused", "me") forced everywhere; or an existing tuner to share."""
        tuner = mode if isinstance(mode, DataflowTuner) else DataflowTuner(mode, cache_file)
        for module in self.modules():
            if isinstance(module, _TunedOp):
                module.tuner = tuner
        self.tuner = tuner
        return tuner

    def dataflow_table(self) -> list[tuple[str, str, str | None]]:
        """(layer name, op, dataflow that ran last) for every tuned layer, in forward order."""
        return [
            (name, repr(m.op), m.last_dataflow) for name, m in self.named_modules() if isinstance(m, _TunedOp)
        ]

    def forward(self, images: Tensor, active: Tensor) -> list[Tensor]:
        """images [B, 3, H, W], active [B, H/32, W/32] -> 4 maps [B, C_i, H/s_i, W/s_i], 0 at masked sites."""
        check_mask(images, active)
        batch, _, height, width = images.shape
        feats = self.forward_sparse(sparsify(images, active))
        return [
            densify(f, (batch, c, height // s, width // s))
            for f, c, s in zip(feats, self.channels, self.strides, strict=True)
        ]
