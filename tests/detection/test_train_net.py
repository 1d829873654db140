"""CPU smoke runs of the fine-tuning entry point: spark-me export -> 2 iterations -> COCO evaluation."""

from __future__ import annotations

import json
import math
from pathlib import Path

from detection.train_net import run


def _check(results: dict, out: Path) -> None:
    for task in ("bbox", "segm"):
        assert math.isfinite(results[task]["AP"]) and 0.0 <= results[task]["AP"] <= 100.0
    assert (out / "model_final.pth").is_file() and (out / "config.yaml").is_file()
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    losses = [m["total_loss"] for m in metrics if "total_loss" in m]
    assert losses and all(math.isfinite(v) for v in losses)


def test_resnet50_smoke_train_then_eval_only(exports, tmp_path: Path) -> None:
    out = tmp_path / "r50"
    results = run(["--smoke", "--weights", str(exports["resnet50.pkl"]), "OUTPUT_DIR", str(out)])
    _check(results, out)
    again = run(
        ["--smoke", "--eval-only", "OUTPUT_DIR", str(out), "MODEL.WEIGHTS", str(out / "model_final.pth")]
    )
    assert again["bbox"]["AP"] == results["bbox"]["AP"]  # the saved model evaluates the same


def test_convnext_smoke(exports, tmp_path: Path) -> None:
    out = tmp_path / "cnx"
    args = ["--smoke", "--config-file", "mask_rcnn_convnext_T_FPN_1x.yaml"]
    args += ["--weights", str(exports["convnext_atto.safetensors"]), "MODEL.TIMM.ARCH", "convnext_atto"]
    _check(run(args + ["OUTPUT_DIR", str(out)]), out)
