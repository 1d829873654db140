"""AdamW with SparK's layer-wise lr multipliers, read back from the optimiser of a real model."""

from __future__ import annotations

import pytest
import torch
from detectron2.modeling import build_model

from detection.config import load_config
from detection.solver import build_optimizer

SPARK_MULTIPLIERS = {  # 0.6 ** (6 - level)
    "backbone.bottom_up.stem.conv1.weight": 0.6**6,
    "backbone.bottom_up.res2.0.conv1.weight": 0.6**5,
    "backbone.bottom_up.res3.3.conv2.weight": 0.6**4,
    "backbone.bottom_up.res4.2.conv3.weight": 0.6**3,
    "backbone.bottom_up.res4.3.conv1.weight": 0.6**2,
    "backbone.bottom_up.res5.0.shortcut.weight": 0.6,
    "backbone.fpn_lateral2.weight": 1.0,
    "roi_heads.box_predictor.cls_score.weight": 1.0,
}


def _lr_and_wd(cfg, model) -> dict[str, tuple[float, float]]:
    optimizer = build_optimizer(cfg, model)
    assert isinstance(optimizer, torch.optim.AdamW)
    by_id = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    return {n: by_id[id(p)] for n, p in model.named_parameters()}


def test_resnet_multipliers_are_sparks() -> None:
    cfg = load_config("mask_rcnn_R_50_FPN_1x.yaml", ["MODEL.DEVICE", "cpu"])
    model = build_model(cfg)
    got = _lr_and_wd(cfg, model)
    for name, multiplier in SPARK_MULTIPLIERS.items():
        assert got[name][0] == pytest.approx(cfg.SOLVER.BASE_LR * multiplier), name
        assert got[name][1] == cfg.SOLVER.WEIGHT_DECAY, name
    assert got["backbone.bottom_up.res2.0.conv1.norm.weight"][1] == 0.0  # no decay on norms
    assert len(got) == sum(1 for p in model.parameters() if p.requires_grad)


def test_convnext_multipliers_follow_its_stages() -> None:
    cfg = load_config(
        "mask_rcnn_convnext_T_FPN_1x.yaml", ["MODEL.DEVICE", "cpu", "MODEL.TIMM.ARCH", "convnext_atto"]
    )
    got = _lr_and_wd(cfg, build_model(cfg))
    base = cfg.SOLVER.BASE_LR
    # convnext_atto: depths (2, 2, 6, 2): stage 2 blocks 0-2 -> level 3, 3-5 -> level 4
    assert got["backbone.bottom_up.model.stem.0.weight"][0] == pytest.approx(base * 0.6**6)
    assert got["backbone.bottom_up.model.stages.0.blocks.1.conv_dw.weight"][0] == pytest.approx(base * 0.6**5)
    assert got["backbone.bottom_up.model.stages.1.downsample.1.weight"][0] == pytest.approx(base * 0.6**4)
    assert got["backbone.bottom_up.model.stages.2.blocks.2.mlp.fc1.weight"][0] == pytest.approx(base * 0.6**3)
    assert got["backbone.bottom_up.model.stages.2.blocks.3.mlp.fc1.weight"][0] == pytest.approx(base * 0.6**2)
    assert got["backbone.bottom_up.model.stages.3.blocks.0.gamma"][0] == pytest.approx(base * 0.6)
    assert got["backbone.bottom_up.out_norms.res2.weight"][0] == pytest.approx(base)


def test_sgd_stays_detectron2s_and_unknown_is_refused() -> None:
    cfg = load_config("mask_rcnn_R_50_FPN_1x.yaml", ["MODEL.DEVICE", "cpu", "SOLVER.OPTIMIZER", "SGD"])
    model = build_model(cfg)
    assert isinstance(build_optimizer(cfg, model), torch.optim.SGD)
    cfg.defrost()
    cfg.SOLVER.OPTIMIZER = "Lion"
    with pytest.raises(ValueError, match="SGD or AdamW"):
        build_optimizer(cfg, model)
