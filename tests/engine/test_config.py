"""Option values are checked when the configuration is read, before any data or model is touched."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from spark_me import cli
from spark_me.engine import pretrain
from spark_me.engine.config import resolve, resolved_warmup

BAD = [
    (["--mask_ratio", "1.0"], "--mask_ratio 1.0"),
    (["--mask_ratio", "-0.1"], "--mask_ratio -0.1"),
    (["--mask_ratio", "0.95", "--input_size", "64"], "keeps no cell"),
    (["--input_size", "70"], "--input_size 70: must be a positive multiple of 32"),
    (["--input_size", "0"], "--input_size 0"),
    (["--input_size", "-64"], "--input_size -64"),
    (["--decoder_width", "100"], "--decoder_width 100"),
    (["--batch_size", "0"], "--batch_size 0: must be >= 1"),
    (["--batch_size", "-4"], "--batch_size -4"),
    (["--accum_iter", "0"], "--accum_iter 0"),
    (["--epochs", "0"], "--epochs 0"),
    (["--val_every", "-1"], "--val_every -1"),
    (["--blr", "0"], "--blr 0.0: must be > 0"),
    (["--drop_path", "1.5"], "--drop_path 1.5"),
]


@pytest.mark.parametrize(("flags", "message"), BAD)
def test_bad_values_are_rejected_naming_the_option(flags: list[str], message: str) -> None:
    with pytest.raises(ValueError) as exc:
        resolve(flags)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ValueError) as exc:
        resolve(["--batch_size", "0", "--input_size", "48", "--mask_ratio", "2"])
    assert all(f"--{name}" in str(exc.value) for name in ("batch_size", "input_size", "mask_ratio"))


def test_bad_values_in_a_yaml_file_too(tmp_path: Path) -> None:
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("batch_size: 0\n")
    with pytest.raises(ValueError, match="--batch_size 0"):
        resolve(["--config", str(cfg_file)])


def test_wrong_types_in_a_yaml_file(tmp_path: Path) -> None:
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("batch_size: eight\nmask_ratio: [0.5]\nlr: fast\nepochs: 2.5\n")
    with pytest.raises(ValueError) as exc:
        resolve(["--config", str(cfg_file)])
    message = str(exc.value)
    assert (
        "--batch_size 'eight': must be an integer" in message
        and "--mask_ratio [0.5]: must be a number" in message
    )
    assert "--epochs 2.5: must be an integer" in message and "--lr 'fast': must be a number" in message


def test_exponent_numbers_in_a_yaml_file_are_numbers(tmp_path: Path) -> None:
    # PyYAML (YAML 1.1) reads 1e-3 without a dot as the string "1e-3"
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("lr: 1e-3\nmin_lr: 1E-6\nblr: 2.0e-4\n")
    cfg = resolve(["--config", str(cfg_file)])
    assert (cfg.lr, cfg.min_lr, cfg.blr) == (1e-3, 1e-6, 2e-4)


def test_edge_values_are_accepted() -> None:
    cfg = resolve(["--mask_ratio", "0", "--input_size", "32", "--batch_size", "1", "--val_every", "0"])
    assert (cfg.mask_ratio, cfg.input_size, cfg.batch_size, cfg.val_every) == (0.0, 32, 1, 0)


def test_pretrain_stops_before_data_or_model(tmp_path: Path, caplog, monkeypatch) -> None:
    def must_not_run(*args, **kwargs):
        raise AssertionError("reached data loading or model building")

    monkeypatch.setattr(pretrain, "build_loader", must_not_run)
    monkeypatch.setattr(pretrain, "build_model", must_not_run)
    with caplog.at_level(logging.ERROR):
        code = cli.main(["pretrain", "--output_dir", str(tmp_path), "--mask_ratio", "1.2"])
    assert code == 1
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is None
    assert "--mask_ratio 1.2: mask ratio must be in [0, 1)" in errors[0].getMessage()
    assert not tmp_path.joinpath("config.yaml").exists()


def test_pretrain_command_line_prints_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "spark_me.cli",
            "pretrain",
            "--output_dir",
            str(tmp_path),
            "--batch_size",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "--batch_size 0: must be >= 1" in lines[0] and result.stdout == ""


def test_data_path_alone_is_the_spark_recipe_and_presets_are_explicit() -> None:
    spark = resolve(["--data_path", "imgs"])
    assert (spark.preset, spark.arch, spark.input_size, spark.blr, spark.epochs) == (
        "spark",
        "resnet50",
        224,
        2e-4,
        1600,
    )
    demo = resolve(["--preset", "demo", "--data_path", "imgs"])
    assert (demo.preset, demo.arch, demo.data_path, demo.blr) == ("demo", "resnet18", "imgs", 0.15)
    assert resolve(["--preset", "spark"]).arch == "resnet50" and resolve([]).preset == "demo"


@pytest.mark.parametrize(
    ("flags", "warmup"),
    [
        (["--data_path", "x"], 40.0),  # SparK's own run
        (["--data_path", "x", "--epochs", "3200"], 40.0),  # longer runs keep the recipe's warmup
        (["--data_path", "x", "--epochs", "2"], 2 * 40 / 1600),  # 2.5 % of a 2-epoch run
        (["--epochs", "6"], 6 * 2 / 24),  # the demo's share (2 of 24 epochs)
        ([], 2.0),
        (["--data_path", "x", "--epochs", "2", "--warmup_epochs", "1.5"], 1.5),  # given: kept
    ],
)
def test_warmup_scales_with_short_runs(flags: list[str], warmup: float) -> None:
    assert resolved_warmup(resolve(flags))[0] == pytest.approx(warmup)


def test_warmup_always_leaves_an_optimiser_step_after_it() -> None:
    from spark_me.engine.optim import warmup_steps

    cfg = resolve(["--epochs", "2", "--warmup_epochs", "5"])
    assert warmup_steps(cfg, 3)[0] == 5 and "cut" in warmup_steps(cfg, 3)[1]  # 6 steps: 5 + 1
    assert warmup_steps(resolve(["--data_path", "x", "--epochs", "2"]), 1)[0] == 0  # 0.05 steps
    assert warmup_steps(resolve(["--epochs", "1", "--warmup_epochs", "1"]), 1)[0] == 0  # 1 step in all


def test_help_shows_every_default() -> None:
    import dataclasses

    from spark_me.engine.config import PretrainConfig, build_parser

    options = {a.dest: a for a in build_parser()._actions}
    flagged = [f.name for f in dataclasses.fields(PretrainConfig) if f.name in options]
    assert len(flagged) == 36  # every field but betas, min_lr_ratio and warmup_lr_ratio has a flag
    for name in flagged:
        assert "(default: " in options[name].help, name
    text = build_parser().format_help()
    assert "(default: resnet50; demo: resnet18)" in text.replace("\n", " ").replace("  ", " ")


@pytest.mark.parametrize(("cores", "local_world", "workers"), [(2, 1, 2), (64, 1, 8), (16, 4, 4), (1, 2, 0)])
def test_workers_default_to_the_cores_available(
    monkeypatch, cores: int, local_world: int, workers: int
) -> None:
    import os

    from spark_me.engine.config import PretrainConfig

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
    assert PretrainConfig().num_workers == workers
    assert resolve(["--data_path", "x"]).num_workers == workers and resolve([]).num_workers == 0  # demo: 0
