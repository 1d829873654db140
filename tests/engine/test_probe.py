"""`spark-me probe`: the k-NN vote against a hand computation, and both probes on the generated
classes (well above chance with their labels, at chance with uninformative ones), starting from a
pretraining checkpoint's layout so that the `--weights` path of the probe is the one users take."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import timm
import torch

from spark_me import cli
from spark_me.engine.probe import knn_scores, topk_hits
from tests._labelled import make_labelled_set

CHANCE = 25.0


def test_knn_votes_are_temperature_weighted_cosine_neighbours() -> None:
    train = torch.tensor([[2.0, 0.0], [0.9, 0.1], [0.0, 3.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 2])
    query = torch.tensor([[1.0, 0.5]])
    cos = [(a * 1.0 + b * 0.5) / math.hypot(a, b) / math.hypot(1.0, 0.5) for a, b in train.tolist()]
    nearest = sorted(range(4), key=lambda i: -cos[i])[:3]  # 0, 1, 2: the opposite point is left out
    want = [0.0, 0.0, 0.0]
    for i in nearest:
        want[int(labels[i])] += math.exp(cos[i] / 0.1)
    got = knn_scores(train, labels, query, num_classes=3, k=3, t=0.1)
    assert got[0].tolist() == pytest.approx(want, rel=1e-5)
    assert topk_hits(got, torch.tensor([0])) == (100.0, 100.0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised ResNet-18 backbone in a pretraining checkpoint's layout."""
    torch.manual_seed(0)
    state = {f"encoder.{k}": v for k, v in timm.create_model("resnet18", num_classes=0).state_dict().items()}
    config = {"arch": "resnet18", "mask_ratio": 0.6, "model_kwargs": {}}
    path = tmp_path_factory.mktemp("probe") / "checkpoint-last.pth"
    torch.save({"model": state, "optimizer": {}, "epoch": 0, "step": 1, "config": config}, path)
    return path


def probe(data: Path, out: Path, weights: Path, method: str) -> dict:
    args = ["probe", "--data_path", str(data), "--arch", "resnet18", "--weights", str(weights)]
    args += ["--input_size", "32", "--num_workers", "0", "--method", method, "--output_dir", str(out)]
    assert cli.main(args) == 0
    return json.loads((out / "log.txt").read_text().splitlines()[-1])


@pytest.mark.parametrize("method", ["knn", "linear"])
def test_probes_separate_the_generated_classes(tmp_path: Path, checkpoint: Path, method: str) -> None:
    informative = probe(make_labelled_set(tmp_path / "set"), tmp_path / "a", checkpoint, method)
    data = make_labelled_set(tmp_path / "null", shuffle_train_labels=True)
    uninformative = probe(data, tmp_path / "b", checkpoint, method)
    assert informative["method"] == method and informative["top1"] >= 55.0, informative
    assert abs(uninformative["top1"] - CHANCE) <= 20.0, uninformative
