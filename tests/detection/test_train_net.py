"""CPU smoke runs of the fine-tuning entry point: spark-me export -> 2 iterations -> COCO evaluation."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from detection.train_net import run


def _check(results: dict, out: Path) -> None:
    for task in ("bbox", "segm"):
        assert math.isfinite(results[task]["AP"]) and 0.0 <= results[task]["AP"] <= 100.0
    assert (out / "model_final.pth").is_file() and (out / "config.yaml").is_file()
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    losses = [m["total_loss"] for m in metrics if "total_loss" in m]
    assert losses and all(math.isfinite(v) for v in losses)


def _predictions(out: Path) -> dict[int, list[dict]]:
    """The per-image detections COCOEvaluator saved, by image id."""
    saved = torch.load(out / "inference" / "instances_predictions.pth", weights_only=False)
    return {p["image_id"]: p.get("instances", []) for p in saved}


def test_resnet50_smoke_train_then_eval_only(exports, tmp_path: Path) -> None:
    """The saved model_final.pth, evaluated alone, makes the same detections, image by image, as
    the trained model did at the end of training (so AP is reproduced for a reason, even at 0)."""
    out = tmp_path / "r50"
    results = run(["--smoke", "--weights", str(exports["resnet50.pkl"]), "OUTPUT_DIR", str(out)])
    _check(results, out)
    trained = _predictions(out)
    shutil.move(out / "inference", out / "inference-train")
    again = run(
        ["--smoke", "--eval-only", "OUTPUT_DIR", str(out), "MODEL.WEIGHTS", str(out / "model_final.pth")]
    )
    reloaded = _predictions(out)
    assert trained.keys() == reloaded.keys() and len(trained) >= 2
    assert sum(len(v) for v in trained.values()) > 0  # (SCORE_THRESH_TEST 0: there are detections)
    for image_id, want in trained.items():
        got = reloaded[image_id]
        assert len(got) == len(want), image_id
        for g, w in zip(got, want, strict=True):
            assert g["category_id"] == w["category_id"]
            assert g["bbox"] == pytest.approx(w["bbox"], rel=1e-4, abs=1e-3)
            assert g["score"] == pytest.approx(w["score"], rel=1e-4, abs=1e-6)
    assert again["bbox"]["AP"] == pytest.approx(results["bbox"]["AP"], abs=1e-9)


def test_convnext_smoke(exports, tmp_path: Path) -> None:
    out = tmp_path / "cnx"
    args = ["--smoke", "--config-file", "mask_rcnn_convnext_T_FPN_1x.yaml", "--output-dir", str(out)]
    args += ["--weights", str(exports["convnext_atto.safetensors"]), "MODEL.TIMM.ARCH", "convnext_atto"]
    _check(run(args), out)  # --output-dir, the named flag the README uses
