"""`spark-me export` / `spark-me import-timm` end to end, through files."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import timm
import torch

import converters
import spark_me
from spark_me import cli

from .._fixtures import randomize


def spark_checkpoint(tmp_path: Path, gen, arch="resnet18", **kw) -> tuple[Path, torch.nn.Module]:
    model = spark_me.SparK(spark_me.create_encoder(arch, **kw), decoder_width=64)
    randomize(model.encoder, gen)
    path = tmp_path / "checkpoint-last.pth"
    torch.save({"model": model.state_dict(), "epoch": 1, "config": {"arch": arch, "model_kwargs": kw}}, path)
    return path, model.encoder


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_export_to_timm(tmp_path: Path, gen, suffix: str) -> None:
    kw = {"depths": (1, 1, 1, 1), "dims": (8, 16, 24, 32)}
    ckpt, encoder = spark_checkpoint(tmp_path, gen, "convnextv2_atto", **kw)
    out = tmp_path / f"timm{suffix}"
    assert cli.main(["export", str(ckpt), "--to", "timm", "-o", str(out)]) == 0
    dense = timm.create_model("convnextv2_atto", **kw).eval()
    dense.load_state_dict(converters.load_state(out), strict=False)
    images = torch.randn(1, 3, 64, 64, generator=gen)
    expected = dense.forward_intermediates(images, indices=[3], intermediates_only=True)[0]
    got = encoder.eval()(images, torch.ones(1, 2, 2, dtype=torch.bool))[3]
    assert float((got - expected).abs().max() / expected.abs().max()) <= 1e-5


def test_export_to_detectron2(tmp_path: Path, gen) -> None:
    ckpt, encoder = spark_checkpoint(tmp_path, gen)
    out = tmp_path / "r18.pkl"
    assert cli.main(["export", str(ckpt), "--to", "detectron2", "-o", str(out)]) == 0
    with open(out, "rb") as fh:
        d2 = pickle.load(fh)
    assert torch.equal(torch.as_tensor(d2["model"]["res5.1.conv2.weight"]), encoder.layer4[1].conv2.weight)


def test_import_timm(tmp_path: Path, gen) -> None:
    dense = timm.create_model("resnet18")
    randomize(dense, gen)
    src = tmp_path / "supervised.pth"
    torch.save(dense.state_dict(), src)
    out = tmp_path / "init.pth"
    assert cli.main(["import-timm", str(src), "--arch", "resnet18", "-o", str(out)]) == 0
    encoder = spark_me.create_encoder("resnet18")
    encoder.load_state_dict(torch.load(out, weights_only=True), strict=True)
    assert torch.equal(encoder.conv1.weight, dense.conv1.weight)


def test_export_needs_an_architecture(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "enc.pth"
    torch.save(spark_me.create_encoder("resnet18").state_dict(), path)
    with pytest.raises(SystemExit, match="--arch"):
        cli.main(["export", str(path), "-o", str(tmp_path / "x.pth")])
    assert cli.main(["export", str(path), "--arch", "resnet18", "-o", str(tmp_path / "x.pth")]) == 0
    assert cli.main(["export", str(path), "--arch", "resnet50", "-o", str(tmp_path / "y.pth")]) == 1
    (error,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert "does not match 'resnet50'" in error and "keys look like resnet18" in error and "\n" not in error
    assert not (tmp_path / "y.pth").exists()
    assert (
        cli.main(
            ["export", str(tmp_path / "nothing.pth"), "--arch", "resnet18", "-o", str(tmp_path / "z.pth")]
        )
        == 1
    )
    assert "no such checkpoint" in caplog.text
