"""The `spark-me` command line: the smoke check, help, unknown commands."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from spark_me import cli


def test_smoke_check_passes(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        assert cli.main(["smoke"]) == 0
    assert "smoke check passed" in caplog.text
    assert caplog.text.count("vs F.conv2d") == 6


def test_every_subcommand_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("pretrain", "bench"):  # their flags live in their own parsers
        with pytest.raises(SystemExit) as exc:
            cli.main([command, "--help"])
        assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--mask_ratio" in out and "--ratios" in out


def test_unknown_subcommand_is_an_error() -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["nonsense"])
    assert exc.value.code == 2


# -- a file that is not a checkpoint: one line naming it, exit 1, no traceback ----------------------
def bad_files(folder: Path) -> dict[str, Path]:
    """An image, a truncated torch file and a pickle that weights_only refuses, all named .pth."""
    import argparse as ap

    import torch
    from PIL import Image

    files = {name: folder / f"{name}.pth" for name in ("image", "truncated", "refused")}
    Image.new("RGB", (32, 32)).save(files["image"], format="PNG")
    torch.save({"w": torch.zeros(256, 256)}, files["truncated"])
    files["truncated"].write_bytes(files["truncated"].read_bytes()[:5000])
    torch.save({"model": {}, "args": ap.Namespace(lr=1)}, files["refused"])
    return files


def command(name: str, path: Path, out: Path) -> list[str]:
    return {
        "export": ["export", str(path), "-o", str(out)],
        "import-timm": ["import-timm", str(path), "--arch", "resnet18", "-o", str(out)],
        "reconstruct": ["reconstruct", str(path), "-o", str(out)],
        "finetune-det": ["finetune-det", "--smoke", "--weights", str(path)],
    }[name]


COMMANDS = ("export", "import-timm", "reconstruct", "finetune-det")


@pytest.mark.parametrize("name", COMMANDS)
@pytest.mark.parametrize("kind", ["image", "truncated", "refused"])
def test_not_a_checkpoint_is_one_error_line(tmp_path: Path, caplog, name: str, kind: str) -> None:
    path = bad_files(tmp_path)[kind]
    out = tmp_path / "out.pth"
    with caplog.at_level(logging.INFO):
        assert cli.main(command(name, path, out)) == 1
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is None
    message = errors[0].getMessage()
    assert "\n" not in message and str(path) in message and "torch checkpoint or state_dict" in message
    assert not out.exists()


@pytest.mark.parametrize("name", COMMANDS)
def test_not_a_checkpoint_on_the_real_command_line(tmp_path: Path, name: str) -> None:
    path = bad_files(tmp_path)["image"]
    result = subprocess.run(
        [sys.executable, "-m", "spark_me.cli", *command(name, path, tmp_path / "out.pth")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"spark-me {name}: {path} is not a torch checkpoint" in lines[0]


def test_reconstruct_refuses_bad_sizes_before_building_a_model(tmp_path: Path, caplog, monkeypatch) -> None:
    import torch

    from spark_me.engine import pretrain

    path = tmp_path / "checkpoint.pth"
    config = {"arch": "resnet18", "decoder_width": 64, "mask_ratio": 0.6, "input_size": 64}
    torch.save({"model": {}, "optimizer": {}, "epoch": 0, "step": 0, "config": config}, path)
    monkeypatch.setattr(pretrain, "build_model", lambda cfg: pytest.fail("built a model"))
    for flags, expected in (
        (["--input_size", "50"], "--input_size 50: must be a positive multiple of 32"),
        (["--mask_ratio", "1"], "--mask_ratio 1.0: mask ratio must be in [0, 1)"),
    ):
        assert cli.main(["reconstruct", str(path), *flags]) == 1
        assert expected in caplog.text


def _stderr(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "spark_me.cli", *args], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    return result.stderr


def test_quiet_by_default_and_verbose_shows_everything() -> None:
    """MinkowskiEngine's CPU_ONLY notice (the intended CPU build) and dependencies' deprecation
    notices are not shown; --verbose (before or after the subcommand) shows them."""
    quiet = _stderr("smoke")
    assert "CPU_ONLY" not in quiet and "Warning" not in quiet, quiet
    assert "smoke check passed" in quiet
    for verbose in (["-v", "smoke"], ["smoke", "--verbose"]):
        assert "compiled with CPU_ONLY flag" in _stderr(*verbose)


def test_finetune_det_help_is_clean() -> None:
    """No deprecation notices of Detectron2's dependencies before the usage, and the usage examples
    keep their lines (the docstring's line continuation used to glue two together)."""
    from ._fixtures import require_detectron2

    require_detectron2()
    result = subprocess.run(
        [sys.executable, "-m", "spark_me.cli", "finetune-det", "--help"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert "--output-dir" in result.stdout and "--verbose" in result.stdout
    assert all(len(line) < 120 for line in result.stdout.splitlines()), result.stdout
