"""The three pretraining steps being compared; they share SparK's densify, decoder, loss and LAMB.

sparse        spark-me: visible pixels as ME sparse tensors (the product)
masked_dense  SparK's official emulation: dense convs on the zero-filled image, re-masked after
              every op, BN over active sites (spark_me.models.reference)
dense         the same network on the whole image, no masking (the cost of plain dense training)
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import Tensor

from spark_me.models.reference import MaskedDenseEncoder, _Masker
from spark_me.models.registry import create_encoder
from spark_me.models.spark import SparK
from spark_me.sparse.layers import SparseBatchNorm2d
from spark_me.sparse.tensor import upsample_mask

VARIANTS = ("sparse", "masked_dense", "dense")


def _dense_norm(norm, x: Tensor, masker: _Masker | None) -> Tensor:
    """The densify norm applied to a dense map (over active sites only when a masker is given)."""
    if isinstance(norm, SparseBatchNorm2d):
        if masker is None:
            return torch.nn.BatchNorm2d.forward(norm, x)
        # the sparse BN's own parameters and statistics, through BatchNorm2d's dense forward
        return masker.batch_norm(lambda t: torch.nn.BatchNorm2d.forward(norm, t), x)
    out = F.layer_norm(x.permute(0, 2, 3, 1), norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    return out.permute(0, 3, 1, 2)


class MaskedDenseSparK(SparK):
    """SparK with the masked-dense reference encoder (timm modules) in place of the sparse one."""

    def __init__(self, arch: str, decoder_width: int, mask_ratio: float, masked: bool = True):
        super().__init__(create_encoder(arch), decoder_width=decoder_width, mask_ratio=mask_ratio)
        self.encoder = MaskedDenseEncoder(timm.create_model(arch, num_classes=0))
        self.masked = masked

    def encode(self, images: Tensor, active: Tensor) -> list[Tensor]:
        if self.masked:
            return self.encoder(images, active)
        indices = [1, 2, 3, 4] if self.encoder.model.__class__.__name__ == "ResNet" else [0, 1, 2, 3]
        return self.encoder.model.forward_intermediates(images, indices=indices, intermediates_only=True)

    def densify(self, feats: list[Tensor], active: Tensor, image_hw) -> list[Tensor]:
        masker = _Masker(active) if self.masked else None
        out = []
        for i, x in enumerate(reversed(feats)):
            x = _dense_norm(self.densify_norms[i], x, masker)
            if self.masked:
                visible = upsample_mask(active, x.shape[2], x.shape[3])
                x = torch.where(visible, x, self.mask_tokens[i].to(x.dtype))
            out.append(self.densify_projs[i](x))
        return out


def build(variant: str, arch: str, decoder_width: int = 768, mask_ratio: float = 0.6) -> SparK:
    if variant == "sparse":
        return SparK(create_encoder(arch), decoder_width=decoder_width, mask_ratio=mask_ratio)
    if variant in ("masked_dense", "dense"):
        return MaskedDenseSparK(arch, decoder_width, mask_ratio, masked=variant == "masked_dense")
    raise ValueError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
