"""`spark-me pretrain` end to end on the CPU: outputs, resume, bad data, non-finite loss."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

import converters
from spark_me import cli
from spark_me.engine.config import resolve

from .conftest import TINY_RUN

TINY = TINY_RUN


def run(tmp: Path, *extra: str) -> int:
    return cli.main(["pretrain", "--output_dir", str(tmp), *TINY, *extra])


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "log.txt").read_text().splitlines()]


def test_zero_argument_config_is_the_demo() -> None:
    cfg = resolve([])
    assert cfg.data_path is None and cfg.preset == "demo" and cfg.arch == "resnet18"
    assert resolve(["--data_path", "x"]).arch == "resnet50"  # the SparK recipe for real data
    assert resolve(["--arch", "convnextv2_atto"]).arch == "convnextv2_atto"  # flags beat the preset


def test_yaml_config_and_flag_precedence(tmp_path: Path) -> None:
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("arch: convnext_atto\nepochs: 7\nmodel_kwargs: {depths: [1, 1, 1, 1]}\n")
    cfg = resolve(["--config", str(cfg_file), "--epochs", "9"])
    assert (cfg.arch, cfg.epochs, cfg.model_kwargs) == ("convnext_atto", 9, {"depths": [1, 1, 1, 1]})
    cfg_file.write_text("epochz: 3\n")
    with pytest.raises(ValueError, match="epochz"):
        resolve(["--config", str(cfg_file)])


def test_run_writes_checkpoint_export_pictures_logs(tmp_path: Path) -> None:
    assert run(tmp_path, "--epochs", "2", "--save_every", "1", "--keep_last", "1") == 0
    for name in (
        "checkpoint-last.pth",
        "timm-last.pth",
        "checkpoint-0002.pth",
        "timm-0002.pth",
        "reconstruction-last.png",
        "config.yaml",
        "log.txt",
    ):
        assert (tmp_path / name).is_file(), name
    assert not (tmp_path / "checkpoint-0001.pth").exists()  # keep_last 1
    assert len(list((tmp_path / "tb").iterdir())) >= 1
    assert [r["epoch"] for r in read_log(tmp_path)] == [1, 2]
    with Image.open(tmp_path / "reconstruction-last.png") as img:
        assert img.size[0] > 4 * 64 and img.mode == "RGB"
    state = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)  # plain types only
    assert {"model", "optimizer", "epoch", "step", "config"} <= state.keys()
    assert state["step"] == 2 * 3 and state["config"]["arch"] == "resnet18"  # 12 training photos / batch 4
    assert any(k.startswith("decoder.") for k in state["model"])  # the decoder is kept
    dense = timm.create_model("resnet18")
    missing = dense.load_state_dict(converters.load_state(tmp_path / "timm-last.pth"), strict=False)
    assert set(missing.missing_keys) == {"fc.weight", "fc.bias"} and not missing.unexpected_keys


def test_extending_a_finished_run(tmp_path: Path) -> None:
    """A finished 1-epoch run asked for 3 epochs continues from its checkpoint at step 3."""
    assert run(tmp_path, "--epochs", "1", "--save_every", "100") == 0
    assert run(tmp_path, "--epochs", "3") == 0
    assert [r["step"] for r in read_log(tmp_path)] == [3, 6, 9]


def test_resume_after_kill_mid_epoch(tmp_path: Path) -> None:
    """Killed in epoch 2, the same command resumes from the end of epoch 1 (the last atomic
    checkpoint) and continues exactly like an uninterrupted run: same steps, same lr schedule, same
    losses (to float rounding: ME's CPU kernels sum in a run-dependent order)."""
    straight, killed_dir = tmp_path / "straight", tmp_path / "killed"
    assert run(straight, "--epochs", "3") == 0
    code = (
        "import sys, spark_me.engine.pretrain as p\n"
        "orig = p.train_one_epoch\n"
        "def dying(*a, **k):\n"
        "    if a[7] == 1: raise SystemExit(9)  # killed during the second epoch\n"
        "    return orig(*a, **k)\n"
        "p.train_one_epoch = dying\n"
        "from spark_me import cli\n"
        f"sys.exit(cli.main(['pretrain', '--output_dir', {str(killed_dir)!r}, *{TINY!r}, '--epochs', '3']))\n"
    )
    killed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert killed.returncode == 9, killed.stderr
    assert torch.load(killed_dir / "checkpoint-last.pth", weights_only=True)["epoch"] == 0
    assert run(killed_dir, "--epochs", "3") == 0
    a, b = read_log(straight), read_log(killed_dir)
    assert [r["epoch"] for r in b] == [1, 2, 3] and [r["step"] for r in b] == [3, 6, 9]
    assert [r["lr"] for r in a] == [r["lr"] for r in b]
    assert [r["weight_decay"] for r in a] == [r["weight_decay"] for r in b]
    for x, y in zip(a, b, strict=True):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-4)


def test_bad_data(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "data"
    (data / "cls").mkdir(parents=True)
    assert cli.main(["pretrain", "--data_path", str(data), "--output_dir", str(tmp_path / "o"), *TINY]) == 1
    assert "no readable images" in caplog.text
    (data / "broken.jpg").write_bytes(b"not an image")
    Image.new("L", (80, 70), 128).save(data / "gray.png")
    Image.new("RGBA", (90, 64), (10, 20, 30, 40)).save(data / "cls" / "rgba.png")
    Image.new("CMYK", (64, 100)).save(data / "cls" / "cmyk.jpg")
    Image.new("RGB", (300, 200)).save(data / "cls" / "big.jpg")
    args = ["pretrain", "--data_path", str(data), "--output_dir", str(tmp_path / "o"), *TINY, "--epochs", "1"]
    assert cli.main(args) == 0
    assert "skipped 1 unreadable image" in caplog.text
    assert cli.main([*args, "--input_size", "70"]) == 1
    assert "multiple of 32" in caplog.text
    assert cli.main([*args, "--arch", "resnet42"]) == 1
    assert "unknown architecture" in caplog.text


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path: Path, caplog, monkeypatch) -> None:
    assert run(tmp_path, "--epochs", "1") == 0
    before = (tmp_path / "checkpoint-last.pth").read_bytes()
    import spark_me.models.spark as spark

    monkeypatch.setattr(spark.SparK, "loss", lambda self, *a: torch.tensor(float("nan"), requires_grad=True))
    assert run(tmp_path, "--epochs", "2") == 1
    assert "loss is nan" in caplog.text
    assert (tmp_path / "checkpoint-last.pth").read_bytes() == before


def test_reconstruct_command(tmp_path: Path) -> None:
    assert run(tmp_path, "--epochs", "1") == 0
    out = tmp_path / "recon.png"
    assert cli.main(["reconstruct", str(tmp_path / "checkpoint-last.pth"), "-o", str(out)]) == 0
    with Image.open(out) as img:
        assert img.size[0] > 4 * 64


def test_mixed_precision_run(tmp_path: Path) -> None:
    """--amp (bf16 on the CPU): the dense decoder runs in bf16, the ME encoder in fp32."""
    assert run(tmp_path, "--epochs", "1", "--amp", "--amp_dtype", "bf16") == 0
    loss = read_log(tmp_path)[0]["train_loss"]
    assert 0.5 < loss < 1.5
    state = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    assert all(v.dtype in (torch.float32, torch.int64) for v in state["model"].values())
