"""The masked-dense reference: SparK's original emulation of sparsity on a plain timm model.

Dense convolutions over the zero-filled image, re-masking after every op that could write into
masked sites, BatchNorm statistics over active sites only, GRN after zeroing masked sites. It shares
no code path with the sparse encoders (it runs timm's own modules), so it is the numerical oracle of
the tests and the "masked-dense" baseline of the benchmarks. The mask is an explicit argument.
"""

from __future__ import annotations

import timm
import torch
from timm.models.convnext import ConvNeXt
from timm.models.resnet import ResNet
from torch import Tensor, nn

from spark_me.models.encoder import check_mask
from spark_me.sparse.tensor import upsample_mask


class _Masker:
    """Zeroes the masked sites of maps at any stride, channels-first or channels-last."""

    def __init__(self, active: Tensor):
        self.active = active

    def grid(self, height: int, width: int) -> Tensor:
        return upsample_mask(self.active, height, width)  # [B, 1, H, W] bool

    def __call__(self, x: Tensor, channels_last: bool = False) -> Tensor:
        if channels_last:
            return x * self.grid(x.shape[1], x.shape[2]).permute(0, 2, 3, 1)
        return x * self.grid(x.shape[2], x.shape[3])

    def batch_norm(self, bn: nn.BatchNorm2d, x: Tensor) -> Tensor:
        """BN whose statistics come from the active sites only; masked sites stay 0."""
        keep = self.grid(x.shape[2], x.shape[3])[:, 0]  # [B, H, W]
        vectors = x.permute(0, 2, 3, 1)[keep]  # [N, C]
        normed = bn(vectors.t().contiguous()[None, :, :, None])[0, :, :, 0].t()  # see SparseBatchNorm2d
        out = x.new_zeros(x.shape[0], x.shape[2], x.shape[3], x.shape[1])
        out[keep] = normed
        return out.permute(0, 3, 1, 2)


def _resnet_forward(model: ResNet, images: Tensor, m: _Masker) -> list[Tensor]:
    x = m(model.conv1(m(images)))
    x = m(model.maxpool(model.act1(m.batch_norm(model.bn1, x))))
    outs = []
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:
            shortcut = x
            bottleneck = hasattr(block, "conv3")
            x = block.act1(m.batch_norm(block.bn1, m(block.conv1(x))))
            x = m.batch_norm(block.bn2, m(block.conv2(x)))
            if bottleneck:
                x = m.batch_norm(block.bn3, m(block.conv3(block.act2(x))))
            if block.drop_path is not None:
                x = block.drop_path(x)
            if block.downsample is not None:
                conv, bn = block.downsample
                shortcut = m.batch_norm(bn, m(conv(shortcut)))
            x = (block.act3 if bottleneck else block.act2)(x + shortcut)
        outs.append(x)
    return outs


def _convnext_forward(model: ConvNeXt, images: Tensor, m: _Masker) -> list[Tensor]:
    x = m(model.stem[1](m(model.stem[0](m(images)))))
    outs = []
    for stage in model.stages:
        if not isinstance(stage.downsample, nn.Identity):
            norm, conv = stage.downsample
            x = m(conv(m(norm(x))))
        for block in stage.blocks:
            shortcut = x
            x = m(block.conv_dw(x))
            channels_last = not block.use_conv_mlp
            if channels_last:
                x = x.permute(0, 2, 3, 1)
            x = block.mlp.act(block.mlp.fc1(block.norm(x)))
            if hasattr(block.mlp, "grn"):
                x = block.mlp.grn(m(x, channels_last))  # GRN's image-wide norm must not see masked sites
            x = block.mlp.fc2(x)
            if channels_last:
                x = x.permute(0, 3, 1, 2)
            if block.gamma is not None:
                x = x * block.gamma.reshape(1, -1, 1, 1)
            x = m(block.drop_path(x) + shortcut)
        outs.append(x)
    return outs


class MaskedDenseEncoder(nn.Module):
    """A timm ResNet / ConvNeXt run SparK's masked-dense way; same contract as the sparse encoders."""

    def __init__(self, model: nn.Module):
        super().__init__()
        if not isinstance(model, ResNet | ConvNeXt):
            raise TypeError(f"no masked-dense forward for {type(model).__name__}")
        self.model = model

    def forward(self, images: Tensor, active: Tensor) -> list[Tensor]:
        """images [B, 3, H, W], active [B, H/32, W/32] -> 4 maps at strides 4..32, 0 at masked sites."""
        check_mask(images, active)
        masker = _Masker(active.to(images.device, torch.bool))
        if isinstance(self.model, ResNet):
            return _resnet_forward(self.model, images, masker)
        return _convnext_forward(self.model, images, masker)


def create_reference(arch: str, **kwargs) -> MaskedDenseEncoder:
    """The timm model `arch` (no classifier) wrapped for masked-dense forward."""
    return MaskedDenseEncoder(timm.create_model(arch, pretrained=False, num_classes=0, **kwargs))
