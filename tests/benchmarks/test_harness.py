"""The benchmark harness runs end to end at tiny sizes and writes well-formed results (no timing asserted)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from benchmarks.harness import main
from benchmarks.variants import build

from .._fixtures import randomize


def test_tiny_sweep_writes_json_csv_plots(tmp_path: Path) -> None:
    args = [
        "--archs",
        "resnet18",
        "--sizes",
        "64",
        "--ratios",
        "0.5",
        "--batch_size",
        "2",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--decoder_width",
        "64",
        "--device",
        "cpu",
        "--out",
        str(tmp_path),
    ]
    assert main(args) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert {"torch", "minkowskiengine", "threads", "cpu"} <= data["environment"].keys()
    rows = data["results"]
    assert sorted(r["variant"] for r in rows) == ["dense", "masked_dense", "sparse"]
    for row in rows:
        assert "error" not in row, row
        assert row["step_s"] > 0 and row["images_per_s"] > 0 and row["peak_mem_mib"] >= 0
    (ratio,) = data["ratios"]
    assert ratio["mask_ratio"] == 0.5 and ratio["speedup_vs_masked_dense"] > 0
    with open(tmp_path / "results.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 3
    assert (tmp_path / "throughput.png").stat().st_size > 0 and (tmp_path / "memory.png").stat().st_size > 0


@pytest.mark.parametrize("arch", ["resnet18", "convnextv2_atto"])
def test_variants_compute_the_same_loss(gen, arch: str) -> None:
    """The masked-dense variant is the same model as the sparse one (same weights -> same loss).

    Norms, layer scales and mask tokens are randomised first (tests/_fixtures.py): at their inits
    whole residual branches vanish and the comparison would not see them."""
    import torch

    import spark_me

    sparse, dense = build("sparse", arch, decoder_width=64), build("masked_dense", arch, decoder_width=64)
    randomize(sparse, gen)
    missing = dense.load_state_dict(
        {k: v for k, v in sparse.state_dict().items() if not k.startswith("encoder.")}, strict=False
    )
    assert all(k.startswith("encoder.") for k in missing.missing_keys)
    dense.encoder.model.load_state_dict(sparse.encoder.state_dict(), strict=False)
    images = torch.randn(2, 3, 64, 64, generator=gen)
    active = spark_me.random_mask(2, 64, 64, 0.5, generator=gen)
    assert float(sparse(images, active)) == pytest.approx(float(dense(images, active)), rel=1e-4)


def test_cuda_without_a_gpu_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without a GPU
    assert main(["--device", "cuda", "--out", str(tmp_path / "out")]) == 2
    assert "sees no CUDA GPU" in caplog.text and not (tmp_path / "out").exists()
