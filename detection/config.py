"""Detectron2 configs for spark-me backbones: model-zoo bases, spark-me keys, pretraining statistics."""

from __future__ import annotations

from pathlib import Path

import yaml
from detectron2 import model_zoo
from detectron2.config import CfgNode, get_cfg

import detection.backbone  # noqa: F401  (registers build_timm_fpn_backbone for configs that name it)

CONFIG_DIR = Path(__file__).parent / "configs"
ZOO_PREFIX = "model_zoo:"


def add_spark_config(cfg: CfgNode) -> CfgNode:
    """Keys Detectron2 lacks: the optimiser choice, layer-wise lr decay and the timm backbone."""
    cfg.SOLVER.OPTIMIZER = "SGD"  # "AdamW" in spark-me's configs (SparK's recipe)
    cfg.SOLVER.LAYER_DECAY = 1.0  # lr multiplier decay per backbone depth level (1.0: none)
    cfg.MODEL.TIMM = CfgNode()
    cfg.MODEL.TIMM.ARCH = "convnext_tiny"
    cfg.MODEL.TIMM.DROP_PATH_RATE = 0.0
    cfg.MODEL.TIMM.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    return cfg


def resolve_config_file(path: str | Path) -> Path:
    """A path, or the name of a file in detection/configs (e.g. `mask_rcnn_R_50_FPN_1x.yaml`)."""
    path = Path(path)
    if path.is_file():
        return path
    if (CONFIG_DIR / path).is_file():
        return CONFIG_DIR / path
    known = ", ".join(sorted(p.name for p in CONFIG_DIR.glob("*.yaml")))
    raise FileNotFoundError(f"no config file {path} (spark-me's configs: {known})")


def _merge(cfg: CfgNode, path: Path) -> None:
    """Merge `path` into `cfg`, following `_BASE_` chains that may end in Detectron2's model zoo."""
    data = yaml.safe_load(path.read_text()) or {}
    base = data.pop("_BASE_", None)
    if base:
        if base.startswith(ZOO_PREFIX):
            cfg.merge_from_file(model_zoo.get_config_file(base[len(ZOO_PREFIX) :]))
        else:
            _merge(cfg, (path.parent / base).resolve())
    cfg.merge_from_other_cfg(CfgNode(data))  # yacs parses '(480, 512)' strings itself


def load_config(path: str | Path, opts: list[str] | tuple[str, ...] = ()) -> CfgNode:
    """Detectron2 defaults + spark-me keys + the config file (and its bases) + `KEY VALUE` overrides."""
    cfg = add_spark_config(get_cfg())
    _merge(cfg, resolve_config_file(path))
    cfg.merge_from_list(list(opts))
    return cfg
