"""The configs say SparK's recipe (../shared facts: Mask R-CNN R50-FPN, SyncBN, RGB, AdamW + layer decay)."""

from __future__ import annotations

import pytest

from detection.config import load_config


def test_r50_1x_is_sparks_recipe() -> None:
    cfg = load_config("mask_rcnn_R_50_FPN_1x.yaml")
    assert cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN" and cfg.MODEL.MASK_ON
    assert cfg.MODEL.BACKBONE.NAME == "build_resnet_fpn_backbone" and cfg.MODEL.RESNETS.DEPTH == 50
    assert cfg.INPUT.FORMAT == "RGB" and cfg.MODEL.RESNETS.STRIDE_IN_1X1 is False
    assert list(cfg.MODEL.PIXEL_MEAN) == [123.675, 116.28, 103.53]
    assert list(cfg.MODEL.PIXEL_STD) == [58.395, 57.12, 57.375]
    assert cfg.MODEL.BACKBONE.FREEZE_AT == 0
    norms = (
        cfg.MODEL.RESNETS.NORM,
        cfg.MODEL.FPN.NORM,
        cfg.MODEL.ROI_BOX_HEAD.NORM,
        cfg.MODEL.ROI_MASK_HEAD.NORM,
    )
    assert norms == ("SyncBN",) * 4
    assert (cfg.MODEL.ROI_BOX_HEAD.NUM_CONV, cfg.MODEL.ROI_BOX_HEAD.NUM_FC) == (4, 1)
    assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == tuple(range(480, 897, 32)) and cfg.INPUT.MAX_SIZE_TRAIN == 1333
    assert (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST) == (800, 1333)
    s = cfg.SOLVER
    assert (s.OPTIMIZER, s.BASE_LR, s.WEIGHT_DECAY, s.WEIGHT_DECAY_NORM, s.LAYER_DECAY) == (
        "AdamW",
        2.5e-4,
        1e-4,
        0.0,
        0.6,
    )
    assert (s.IMS_PER_BATCH, s.MAX_ITER, tuple(s.STEPS), s.GAMMA) == (16, 90000, (60000, 80000), 0.25)
    assert (s.WARMUP_ITERS, s.WARMUP_FACTOR) == (1000, 0.01)
    assert cfg.TEST.PRECISE_BN.ENABLED and cfg.TEST.EVAL_PERIOD == 5000
    assert cfg.MODEL.WEIGHTS == ""  # never ImageNet weights by accident: the export comes via --weights


def test_3x_and_convnext_inherit_and_override() -> None:
    three = load_config("mask_rcnn_R_50_FPN_3x.yaml")
    assert (three.SOLVER.MAX_ITER, tuple(three.SOLVER.STEPS)) == (270000, (210000, 250000))
    assert three.MODEL.RESNETS.NORM == "SyncBN" and three.INPUT.FORMAT == "RGB"
    cnx = load_config("mask_rcnn_convnext_T_FPN_1x.yaml", ["MODEL.TIMM.ARCH", "convnextv2_nano"])
    assert cnx.MODEL.BACKBONE.NAME == "build_timm_fpn_backbone" and cnx.MODEL.TIMM.ARCH == "convnextv2_nano"
    assert cnx.SOLVER.LAYER_DECAY == 0.6


def test_unknown_config_names_the_known_ones() -> None:
    with pytest.raises(FileNotFoundError, match="mask_rcnn_R_50_FPN_1x.yaml"):
        load_config("mask_rcnn_R_101.yaml")
