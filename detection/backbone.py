"""timm ConvNeXt (V1/V2) as a Detectron2 bottom-up backbone with FPN, from spark-me's timm export.

SparK's recipe fine-tunes ResNets with Detectron2's own ResNet; ConvNeXt users get the same tool by
wrapping the timm model the export loads into (`model.*` keys are timm's, one-to-one).
"""

from __future__ import annotations

import timm
import torch
from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, FPN, Backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from timm.layers import LayerNorm2d
from torch import nn

STAGE_NAMES = ("res2", "res3", "res4", "res5")


class TimmBackbone(Backbone):
    """Stage outputs of a timm hierarchical model as `res2..res5` (strides 4..32), each LayerNorm-ed.

    The per-output LayerNorm (new, not pretrained) gives FPN inputs of comparable scale, as ConvNeXt's
    own detection backbones do; it is reported as initialised when weights are loaded.
    """

    pretrained_prefix = "model."  # keys under this prefix come from the timm export

    def __init__(self, arch: str, out_features=STAGE_NAMES, drop_path_rate: float = 0.0, in_chans: int = 3):
        super().__init__()
        unknown = [f for f in out_features if f not in STAGE_NAMES]
        if unknown:
            raise ValueError(f"unknown output features {unknown}; choose from {list(STAGE_NAMES)}")
        self.model = timm.create_model(
            arch, pretrained=False, num_classes=0, drop_path_rate=drop_path_rate, in_chans=in_chans
        )
        self.model.prune_intermediate_layers(indices=len(STAGE_NAMES), prune_head=True)
        self.model.head = nn.Identity()  # the classifier's norm is not used for features
        info = self.model.feature_info
        if len(info) != len(STAGE_NAMES):
            raise ValueError(f"{arch} has {len(info)} feature stages; a 4-stage hierarchical model is needed")
        self._out_features = list(out_features)
        self._out_feature_strides = {n: int(i["reduction"]) for n, i in zip(STAGE_NAMES, info, strict=True)}
        self._out_feature_channels = {n: int(i["num_chs"]) for n, i in zip(STAGE_NAMES, info, strict=True)}
        self.out_norms = nn.ModuleDict({n: LayerNorm2d(self._out_feature_channels[n]) for n in out_features})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: [B, 3, H, W] -> {res2: [B, C2, H/4, W/4], ..., res5: [B, C5, H/32, W/32]}."""
        feats = self.model.forward_intermediates(x, indices=len(STAGE_NAMES), intermediates_only=True)
        named = dict(zip(STAGE_NAMES, feats, strict=True))
        return {n: self.out_norms[n](named[n]) for n in self._out_features}

    def output_shape(self) -> dict[str, ShapeSpec]:
        return {
            n: ShapeSpec(channels=self._out_feature_channels[n], stride=self._out_feature_strides[n])
            for n in self._out_features
        }


@BACKBONE_REGISTRY.register()
def build_timm_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> Backbone:
    """`MODEL.BACKBONE.NAME: build_timm_fpn_backbone`, arch from `MODEL.TIMM.ARCH`."""
    bottom_up = TimmBackbone(
        cfg.MODEL.TIMM.ARCH,
        out_features=cfg.MODEL.TIMM.OUT_FEATURES,
        drop_path_rate=cfg.MODEL.TIMM.DROP_PATH_RATE,
        in_chans=input_shape.channels,
    )
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
