"""Sparse ConvNeXt V1 and V2 whose `state_dict` is key-for-key that of timm's `convnext*(num_classes=0)`
(less timm's classification `head.norm`, which SparK does not use).

V2 adds GRN in the MLP, normalised per image over its active sites (as the dense model does, unlike
FCMAE's batch-wide sparse GRN), and drops layer scale. The small variants (atto..nano) use timm's
`conv_mlp` layout, where the MLP weights are [out, in, 1, 1].
"""

from __future__ import annotations

import MinkowskiEngine as ME
import torch
from torch import nn

from spark_me.models.encoder import SparseEncoder
from spark_me.models.registry import register_encoder
from spark_me.sparse.layers import (
    SparseActivation,
    SparseConv2d,
    SparseDepthwiseConv2d,
    SparseDropPath,
    SparseGRN,
    SparseLayerNorm,
    SparseLinear,
    add,
    with_features,
)


class SparseMlp(nn.Module):
    """fc1 -> GELU -> (GRN) -> fc2, per site; names as timm's Mlp / GlobalResponseNormMlp."""

    def __init__(self, dim: int, hidden: int, use_grn: bool, conv_shaped: bool):
        super().__init__()
        self.fc1 = SparseLinear(dim, hidden, conv_shaped=conv_shaped)
        self.act = SparseActivation(nn.GELU())
        self.grn = SparseGRN(hidden) if use_grn else None
        self.fc2 = SparseLinear(hidden, dim, conv_shaped=conv_shaped)

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        x = self.act(self.fc1(x))
        if self.grn is not None:
            x = self.grn(x)
        return self.fc2(x)


class SparseConvNeXtBlock(nn.Module):
    def __init__(
        self,
        dim: int,
        drop_path: float,
        ls_init_value: float | None,
        use_grn: bool,
        conv_mlp: bool,
        kernel_size: int = 7,
        mlp_ratio: int = 4,
        eps: float = 1e-6,
    ):
        super().__init__()
        self.conv_dw = SparseDepthwiseConv2d(dim, kernel_size)
        self.norm = SparseLayerNorm(dim, eps=eps)
        self.mlp = SparseMlp(dim, mlp_ratio * dim, use_grn, conv_shaped=conv_mlp)
        self.gamma = nn.Parameter(ls_init_value * torch.ones(dim)) if ls_init_value is not None else None
        self.drop_path = SparseDropPath(drop_path)

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        shortcut = x
        x = self.mlp(self.norm(self.conv_dw(x)))
        if self.gamma is not None:
            x = with_features(x, x.F * self.gamma)
        return add(self.drop_path(x), shortcut)


class SparseConvNeXtStage(nn.Module):
    def __init__(
        self, in_chs: int, out_chs: int, downsample: bool, drop_paths: list[float], eps: float, **block_kw
    ):
        super().__init__()
        self.downsample = (
            nn.Sequential(SparseLayerNorm(in_chs, eps=eps), SparseConv2d(in_chs, out_chs, 2, 2, bias=True))
            if downsample
            else nn.Identity()
        )
        self.blocks = nn.Sequential(
            *[SparseConvNeXtBlock(out_chs, dp, eps=eps, **block_kw) for dp in drop_paths]
        )

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        return self.blocks(self.downsample(x))


class SparseConvNeXt(SparseEncoder):
    """Stem (4x4/4 conv + LayerNorm) and four stages; returns each stage's output (strides 4..32)."""

    def __init__(
        self,
        depths: tuple[int, ...] = (3, 3, 9, 3),
        dims: tuple[int, ...] = (96, 192, 384, 768),
        in_chans: int = 3,
        ls_init_value: float | None = 1e-6,
        use_grn: bool = False,
        conv_mlp: bool = False,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        kernel_size: int = 7,
    ):
        super().__init__()
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError("SparK needs four stages (strides 4, 8, 16, 32)")
        self.stem = nn.Sequential(
            SparseConv2d(in_chans, dims[0], 4, 4, bias=True), SparseLayerNorm(dims[0], eps=norm_eps)
        )
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(list(depths))
        self.stages = nn.Sequential(
            *[
                SparseConvNeXtStage(
                    dims[max(i - 1, 0)],
                    dims[i],
                    downsample=i > 0,
                    drop_paths=rates[i].tolist(),
                    eps=norm_eps,
                    ls_init_value=ls_init_value,
                    use_grn=use_grn,
                    conv_mlp=conv_mlp,
                    kernel_size=kernel_size,
                )
                for i in range(4)
            ]
        )
        self.channels = tuple(dims)
        self.init_weights()

    def init_weights(self) -> None:
        """timm's init: trunc-normal(.02) conv/linear weights, zero biases."""
        for m in self.modules():
            if isinstance(m, SparseConv2d | SparseDepthwiseConv2d | SparseLinear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward_sparse(self, x: ME.SparseTensor) -> list[ME.SparseTensor]:
        x = self.stem(x)
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs


_V1 = {
    "atto": dict(depths=(2, 2, 6, 2), dims=(40, 80, 160, 320), conv_mlp=True),
    "femto": dict(depths=(2, 2, 6, 2), dims=(48, 96, 192, 384), conv_mlp=True),
    "pico": dict(depths=(2, 2, 6, 2), dims=(64, 128, 256, 512), conv_mlp=True),
    "nano": dict(depths=(2, 2, 8, 2), dims=(80, 160, 320, 640), conv_mlp=True),
    "tiny": dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768)),
    "small": dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768)),
    "base": dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024)),
    "large": dict(depths=(3, 3, 27, 3), dims=(192, 384, 768, 1536)),
    "xlarge": dict(depths=(3, 3, 27, 3), dims=(256, 512, 1024, 2048)),
}
_V2 = {k: v for k, v in _V1.items() if k != "xlarge"} | {
    "huge": dict(depths=(3, 3, 27, 3), dims=(352, 704, 1408, 2816)),
}


def _register(name: str, config: dict) -> None:
    def build(**kwargs) -> SparseConvNeXt:
        return SparseConvNeXt(**(config | kwargs))

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"Sparse twin of timm's `{name}`."
    register_encoder(build)


for _size, _cfg in _V1.items():
    _register(f"convnext_{_size}", _cfg)
for _size, _cfg in _V2.items():
    _register(f"convnextv2_{_size}", _cfg | dict(use_grn=True, ls_init_value=None))
