"""Sparse ResNets whose `state_dict` is key-for-key that of timm's `resnetXX(num_classes=0)`.

Same structure as timm's ResNet-B/v1.5 (stride on the 3x3 conv, 1x1 strided projection shortcut),
same stochastic-depth schedule (linear in the block index), on MinkowskiEngine sparse tensors.

Every BN -> ReLU that feeds a conv or the max-pool is folded into that op's input
(`SparseBatchNorm2d.relu_prologue`, bn_relu.py): the op makes relu(bn(y)) from the BN's input y in
its forward and again in its backward, so autograd saves y alone, not y and the ReLU's output. The
`act` modules stay in the tree (timm's module names; they hold no state) and run when
`fold_bn_relu=False` (layer by layer: what the benchmark of the fold compares against).
"""

from __future__ import annotations

import MinkowskiEngine as ME
from torch import nn

from spark_me.models.encoder import SparseEncoder
from spark_me.models.registry import register_encoder
from spark_me.sparse.layers import (
    SparseActivation,
    SparseBatchNorm2d,
    SparseConv2d,
    SparseDropPath,
    SparseMaxPool2d,
    add,
)


def bn_relu(bn: SparseBatchNorm2d, act: SparseActivation, y: ME.SparseTensor, fold: bool) -> tuple:
    """act(bn(y)) as the next op's (input, prologue): folded, y and the prologue with which the op
    makes act(bn(y)) itself (saving y only); or layer by layer, act(bn(y)) and no prologue."""
    return (y, bn.relu_prologue(y)) if fold else (act(bn(y)), None)


class _ResidualBlock(nn.Module):
    """What both kinds of block share: the branch's layers (`build`, registered first, in timm's
    order), then the projection shortcut (`downsample`, or None) and stochastic depth; `fold`:
    whether BN -> ReLU is folded into the next op."""

    expansion: int

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int,
        downsample: nn.Module | None,
        drop_path: float,
        fold_bn_relu: bool = True,
    ):
        super().__init__()
        self.fold = fold_bn_relu
        self.build(inplanes, planes, stride)
        self.downsample = downsample
        self.drop_path = SparseDropPath(drop_path)

    def build(self, inplanes: int, planes: int, stride: int) -> None:
        raise NotImplementedError


class SparseBasicBlock(_ResidualBlock):
    expansion = 1

    def build(self, inplanes: int, planes: int, stride: int) -> None:
        self.conv1 = SparseConv2d(inplanes, planes, 3, stride)
        self.bn1 = SparseBatchNorm2d(planes)
        self.act1 = SparseActivation(nn.ReLU())
        self.conv2 = SparseConv2d(planes, planes, 3)
        self.bn2 = SparseBatchNorm2d(planes)
        self.act2 = SparseActivation(nn.ReLU())

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        shortcut = x
        x = self.drop_path(self.bn2(self.conv2(*bn_relu(self.bn1, self.act1, self.conv1(x), self.fold))))
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        return self.act2(add(x, shortcut))


class SparseBottleneck(_ResidualBlock):
    expansion = 4

    def build(self, inplanes: int, planes: int, stride: int) -> None:
        width = planes
        self.conv1 = SparseConv2d(inplanes, width, 1)
        self.bn1 = SparseBatchNorm2d(width)
        self.act1 = SparseActivation(nn.ReLU())
        self.conv2 = SparseConv2d(width, width, 3, stride)
        self.bn2 = SparseBatchNorm2d(width)
        self.act2 = SparseActivation(nn.ReLU())
        self.conv3 = SparseConv2d(width, planes * self.expansion, 1)
        self.bn3 = SparseBatchNorm2d(planes * self.expansion)
        self.act3 = SparseActivation(nn.ReLU())

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        shortcut = x
        x = self.conv2(*bn_relu(self.bn1, self.act1, self.conv1(x), self.fold))
        x = self.conv3(*bn_relu(self.bn2, self.act2, x, self.fold))
        x = self.drop_path(self.bn3(x))
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        return self.act3(add(x, shortcut))


class SparseResNet(SparseEncoder):
    """Stem (7x7/2 conv, BN, ReLU, 3x3/2 max-pool) and four stages; returns layer1..layer4 (strides 4..32).

    `fold_bn_relu` (default): every BN -> ReLU that feeds a conv or the max-pool is folded into that
    op (the same values and gradients, without the ReLU outputs among the saved activations).
    """

    def __init__(
        self,
        block: type[SparseBasicBlock | SparseBottleneck],
        layers: tuple[int, int, int, int],
        in_chans: int = 3,
        drop_path_rate: float = 0.0,
        zero_init_last: bool = True,
        fold_bn_relu: bool = True,
    ):
        super().__init__()
        self.fold = fold_bn_relu
        self.conv1 = SparseConv2d(in_chans, 64, 7, stride=2)
        self.bn1 = SparseBatchNorm2d(64)
        self.act1 = SparseActivation(nn.ReLU())
        self.maxpool = SparseMaxPool2d(3, 2, channels=64)
        total, index, inplanes = sum(layers), 0, 64
        for stage, (planes, depth) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            stride = 1 if stage == 0 else 2
            blocks = []
            for i in range(depth):
                downsample = None
                if i == 0 and (stride != 1 or inplanes != planes * block.expansion):
                    downsample = nn.Sequential(
                        SparseConv2d(inplanes, planes * block.expansion, 1, stride),
                        SparseBatchNorm2d(planes * block.expansion),
                    )
                rate = drop_path_rate * index / (total - 1) if total > 1 else 0.0
                blocks.append(
                    block(inplanes, planes, stride if i == 0 else 1, downsample, rate, fold_bn_relu)
                )
                inplanes, index = planes * block.expansion, index + 1
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
        self.channels = tuple(p * block.expansion for p in (64, 128, 256, 512))
        self.init_weights(zero_init_last)

    def init_weights(self, zero_init_last: bool) -> None:
        """timm's init: kaiming-normal (fan_out) convs, BN weight 1 / bias 0, last BN of each block 0."""
        for m in self.modules():
            if isinstance(m, SparseConv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, SparseBatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, SparseBasicBlock | SparseBottleneck):
                    m.zero_init_last()

    def forward_sparse(self, x: ME.SparseTensor) -> list[ME.SparseTensor]:
        x = self.maxpool(*bn_relu(self.bn1, self.act1, self.conv1(x), self.fold))
        outs = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            outs.append(x)
        return outs


def _resnet(block: type, default_layers: tuple[int, int, int, int], **kwargs) -> SparseResNet:
    """kwargs may override `layers` (as with timm's model_args), e.g. for small test models."""
    return SparseResNet(**({"block": block, "layers": default_layers} | kwargs))


@register_encoder
def resnet18(**kwargs) -> SparseResNet:
    return _resnet(SparseBasicBlock, (2, 2, 2, 2), **kwargs)


@register_encoder
def resnet34(**kwargs) -> SparseResNet:
    return _resnet(SparseBasicBlock, (3, 4, 6, 3), **kwargs)


@register_encoder
def resnet50(**kwargs) -> SparseResNet:
    return _resnet(SparseBottleneck, (3, 4, 6, 3), **kwargs)


@register_encoder
def resnet101(**kwargs) -> SparseResNet:
    return _resnet(SparseBottleneck, (3, 4, 23, 3), **kwargs)


@register_encoder
def resnet152(**kwargs) -> SparseResNet:
    return _resnet(SparseBottleneck, (3, 8, 36, 3), **kwargs)


@register_encoder
def resnet200(**kwargs) -> SparseResNet:
    return _resnet(SparseBottleneck, (3, 24, 36, 3), **kwargs)
