"""Bad input to every subcommand: a non-zero exit, exactly one message line, no traceback, and the
output folder left exactly as it was.

The table is the test: one row per kind of bad input. To cover a new subcommand (or a new way to
get it wrong), add rows: a name, the command line (`{out}` is the output folder, `{tmp}` the test's
folder with the files `make_inputs` writes), what the message must say, and optionally a `setup`
that puts things into the output folder first (damaged checkpoints, caches) and the exit status
(1 for a refused input, 2 for a command-line error).

The rows run in this process (`cli.main`), which is what the `spark-me` entry point calls; the
last test runs a few of them as real processes to check the real stderr line for line.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

from spark_me import cli
from spark_me.engine import checkpoint

from ._labelled import make_labelled_set
from .engine.conftest import TINY_RUN


@dataclass(frozen=True)
class Row:
    name: str
    argv: list[str]
    expect: str  # a substring of the one message line
    status: int = 1
    setup: Callable[[Path], None] | None = None  # fills the output folder before the run

    @property
    def id(self) -> str:
        return f"{self.argv[0]}: {self.name}"


def make_inputs(tmp: Path) -> None:
    """The files rows refer to: an image, a truncated torch file, a text file, weights, configs."""
    Image.new("RGB", (40, 40), (200, 30, 30)).save(tmp / "photo.png")
    torch.save({"w": torch.zeros(64, 64)}, tmp / "truncated.pth")
    (tmp / "truncated.pth").write_bytes((tmp / "truncated.pth").read_bytes()[:3000])
    (tmp / "a-file.txt").write_text("not a folder\n")
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7)}, tmp / "weights.pth")  # no arch, not a full state
    config = {"arch": "resnet18", "decoder_width": 64, "mask_ratio": 0.6, "input_size": 64}
    torch.save({"model": {}, "optimizer": {}, "epoch": 0, "step": 3, "config": config}, tmp / "full.pth")
    (tmp / "no-images").mkdir()
    (tmp / "no-images" / "notes.txt").write_text("no pictures here")
    (tmp / "bad.yaml").write_text("epochs: 3\nlr: [1e-3, 2e-3\nbatch_size: 8\n")
    (tmp / "list.yaml").write_text("- epochs: 3\n- lr: 0.1\n")
    (tmp / "unknown.yaml").write_text("epochz: 3\n")
    (tmp / "string.yaml").write_text("epochs: ten\n")
    (tmp / "binary.yaml").write_bytes((tmp / "photo.png").read_bytes())
    torch.save(timm.create_model("resnet18").state_dict(), tmp / "timm-resnet18.pth")
    # another arch's full states: the keys of a resnet34 (a few are enough to tell)
    r34 = {"conv1.weight": torch.zeros(64, 3, 7, 7), "layer1.2.conv1.weight": torch.zeros(64, 64, 3, 3)}
    spark = {"model": {f"encoder.{k}": v for k, v in r34.items()}, "optimizer": {}, "epoch": 0, "step": 3,
             "config": {**config, "arch": "resnet34"}}  # fmt: skip
    torch.save(spark, tmp / "pretrain-resnet34.pth")
    best = {"top1": 50.0, "epoch": 1, "source": "model"}
    tuned = {
        "model": r34,
        "optimizer": {},
        "epoch": 0,
        "step": 3,
        "best": best,
        "config": {"arch": "resnet34"},
    }
    torch.save(tuned, tmp / "finetune-resnet34.pth")
    make_labelled_set(tmp / "labelled", train_per_class=2, val_per_class=1, size=16)


def damaged_last(out: Path) -> None:
    """The case of the issue: the only checkpoint is a truncated copy."""
    torch.save({"model": {"w": torch.zeros(256)}, "step": 3}, out / "checkpoint-last.pth")
    (out / "checkpoint-last.pth").write_bytes((out / "checkpoint-last.pth").read_bytes()[:2000])


def damaged_last_older_good(out: Path) -> None:
    """The newest checkpoint damaged, an older one readable: a run that goes on sets the damaged
    one aside, but only once every check has passed."""
    damaged_last(out)
    config = {"arch": "resnet18"}
    torch.save(
        {"model": {}, "optimizer": {}, "epoch": 0, "step": 3, "config": config}, out / "checkpoint-0001.pth"
    )


def all_damaged(out: Path) -> None:
    """Every kind auto-resume looks at, each unreadable in its own way."""
    damaged_last(out)
    (out / "checkpoint-0002.pth").write_bytes(b"garbage")
    Image.new("RGB", (8, 8)).save(out / checkpoint.MID_EPOCH, format="PNG")
    torch.save({"conv1.weight": torch.zeros(1)}, out / "checkpoint-0001.pth")  # weights, not a state


P = ["pretrain", "--output_dir", "{out}", *TINY_RUN]
F = ["finetune", "--output_dir", "{out}"]
ROWS = [
    # -- pretrain: configuration files --------------------------------------------------------------
    Row("config file missing", [*P, "--config", "{tmp}/nope.yaml"], "no such config file"),
    Row(
        "config invalid YAML",
        [*P, "--config", "{tmp}/bad.yaml"],
        "bad.yaml is not valid YAML: line 3, column",
    ),
    Row("config not a mapping", [*P, "--config", "{tmp}/list.yaml"], "holds a YAML list, expected a mapping"),
    Row("config unknown option", [*P, "--config", "{tmp}/unknown.yaml"], "unknown option(s) in"),
    Row("config wrong type", [*P, "--config", "{tmp}/string.yaml"], "--epochs 'ten': must be an integer"),
    Row("config is binary", [*P, "--config", "{tmp}/binary.yaml"], "cannot be read as a YAML text file"),
    # -- pretrain: output folder -------------------------------------------------------------------
    Row(
        "output_dir is a file", [*P, "--output_dir", "{tmp}/a-file.txt"], "a-file.txt is a file, not a folder"
    ),
    Row("output_dir under a file", [*P, "--output_dir", "{tmp}/a-file.txt/run"], "is a file, not a folder"),
    Row("log_dir is a file", [*P, "--log_dir", "{tmp}/a-file.txt"], "--log_dir"),
    Row("output_dir not writable", [*P, "--output_dir", "/sys/spark-me-run"], "/sys is not writable"),
    # -- pretrain: option values -------------------------------------------------------------------
    Row("epochs zero", [*P, "--epochs", "0"], "--epochs 0: must be >= 1"),
    Row("epochs not a number", [*P, "--epochs", "x"], "argument --epochs: invalid int value: 'x'", 2),
    Row("input size not x32", [*P, "--input_size", "70"], "positive multiple of 32"),
    Row("mask ratio 1", [*P, "--mask_ratio", "1"], "--mask_ratio 1.0"),
    Row(
        "model_kwargs not YAML", [*P, "--model_kwargs", "{depths: [1,"], "--model_kwargs: not YAML (line 1", 2
    ),
    Row("model_kwargs not a mapping", [*P, "--model_kwargs", "[1, 2]"], "expected a YAML mapping", 2),
    Row("unknown dataflow", [*P, "--dataflow", "fastest"], "argument --dataflow: invalid choice", 2),
    Row("save_every_steps negative", [*P, "--save_every_steps", "-1"], "--save_every_steps -1: must be >= 0"),
    Row("unknown flag", [*P, "--bogus", "1"], "unrecognized arguments: --bogus 1", 2),
    Row("unknown architecture", [*P, "--arch", "resnet42"], "unknown architecture 'resnet42'"),
    Row("model not importable", [*P, "--model", "nosuchpkg.mod:make"], "cannot import nosuchpkg.mod"),
    Row("model not a factory path", [*P, "--model", "justaname"], "expected 'package.module:factory'"),
    Row("batch larger than the data", [*P, "--batch_size", "25"], "fewer than one batch"),
    # -- pretrain: data, weights, checkpoints ------------------------------------------------------
    Row("data_path missing", [*P, "--data_path", "{tmp}/nowhere"], "nowhere is not a folder"),
    Row("data_path without images", [*P, "--data_path", "{tmp}/no-images"], "no readable images"),
    Row("resume file missing", [*P, "--resume", "{tmp}/nope.pth"], "no such checkpoint"),
    Row("resume an image", [*P, "--resume", "{tmp}/photo.png"], "it is a PNG image"),
    Row("resume truncated", [*P, "--resume", "{tmp}/truncated.pth"], "truncated or damaged"),
    Row("resume encoder weights", [*P, "--resume", "{tmp}/weights.pth"], "not a full pretraining checkpoint"),
    Row(
        "resume another arch's checkpoint",
        [*P, "--resume", "{tmp}/pretrain-resnet34.pth"],
        "it is a resnet34 checkpoint, and this run is --arch resnet18; resume it with --arch resnet34",
    ),  # fmt: skip
    Row("init_weight missing", [*P, "--init_weight", "{tmp}/nope.pth"], "no such checkpoint"),
    Row("auto-resume, only checkpoint damaged", P, "no readable checkpoint", setup=damaged_last),
    Row(
        "auto-resume from an older one, bad data",
        [*P, "--data_path", "{tmp}/nowhere"],
        "is not a folder",
        setup=damaged_last_older_good,
    ),  # fmt: skip
    Row("auto-resume, all damaged", P, "checkpoint-0001.pth: is not a full pretraining", setup=all_damaged),
    # -- finetune and probe ------------------------------------------------------------------------
    Row("no data_path", [*F], "--data_path is required"),
    Row("data_path missing", [*F, "--data_path", "{tmp}/nowhere"], "nowhere is not a folder"),
    Row("data_path without train/val", [*F, "--data_path", "{tmp}/no-images"], "has no train/ and no val/"),
    Row("epochs zero", [*F, "--data_path", "{tmp}", "--epochs", "0"], "--epochs 0: must be >= 1"),
    Row(
        "output_dir is a file", [*F, "--data_path", "{tmp}", "--output_dir", "{tmp}/a-file.txt"], "is a file"
    ),
    Row("config invalid YAML", [*F, "--config", "{tmp}/bad.yaml"], "is not valid YAML: line 3"),
    Row("model_kwargs not YAML", [*F, "--model_kwargs", "{a:"], "--model_kwargs: not YAML", 2),
    Row(
        "auto-resume, only checkpoint damaged",
        [*F, "--data_path", "{tmp}/nowhere"],
        "no readable checkpoint",
        setup=damaged_last,
    ),  # fmt: skip
    Row(
        "resume another arch's checkpoint",
        [
            *F,
            "--data_path",
            "{tmp}/labelled",
            "--arch",
            "resnet18",
            "--input_size",
            "32",
            "--batch_size",
            "2",
            "--num_workers",
            "0",
            "--resume",
            "{tmp}/finetune-resnet34.pth",
        ],
        "it is a resnet34 checkpoint, and this run is --arch resnet18; resume it with --arch resnet34",
    ),  # fmt: skip
    Row("no data_path", ["probe", "--output_dir", "{out}"], "--data_path is required"),
    Row("unknown method", ["probe", "--data_path", "{tmp}", "--method", "svm"], "invalid choice: 'svm'", 2),
    Row("knn_k zero", ["probe", "--data_path", "{tmp}", "--knn_k", "0"], "--knn_k 0: must be >= 1"),
    Row(
        "output_dir under a file",
        ["probe", "--data_path", "{tmp}", "--output_dir", "{tmp}/a-file.txt/p"],
        "is a file",
    ),  # fmt: skip
    Row("config not a mapping", ["probe", "--config", "{tmp}/list.yaml"], "holds a YAML list"),
    # -- reconstruct -------------------------------------------------------------------------------
    Row("checkpoint missing", ["reconstruct", "{tmp}/nope.pth", "-o", "{out}/r.png"], "no such checkpoint"),
    Row("checkpoint truncated", ["reconstruct", "{tmp}/truncated.pth", "-o", "{out}/r.png"], "truncated"),
    Row(
        "output is a folder",
        ["reconstruct", "{tmp}/full.pth", "-o", "{out}"],
        "is a folder; give a file name",
    ),
    Row(
        "output under a file", ["reconstruct", "{tmp}/full.pth", "-o", "{tmp}/a-file.txt/r.png"], "is a file"
    ),
    Row(
        "input size not x32",
        ["reconstruct", "{tmp}/full.pth", "--input_size", "50", "-o", "{out}/r.png"],
        "--input_size 50",
    ),  # fmt: skip
    Row(
        "mask ratio not a number",
        ["reconstruct", "{tmp}/full.pth", "--mask_ratio", "most"],
        "argument --mask_ratio: invalid float value",
        2,
    ),  # fmt: skip
    # -- export ------------------------------------------------------------------------------------
    Row("checkpoint missing", ["export", "{tmp}/nope.pth", "-o", "{out}/e.pth"], "no such checkpoint"),
    Row("checkpoint is an image", ["export", "{tmp}/photo.png", "-o", "{out}/e.pth"], "it is a PNG image"),
    Row("architecture unknown", ["export", "{tmp}/weights.pth", "-o", "{out}/e.pth"], "pass --arch"),
    Row(
        "unknown format",
        ["export", "{tmp}/full.pth", "--to", "onnx", "-o", "{out}/e.pth"],
        "invalid choice",
        2,
    ),
    Row("no output", ["export", "{tmp}/full.pth"], "the following arguments are required: -o/--output", 2),
    # -- import-timm -------------------------------------------------------------------------------
    Row(
        "weights missing",
        ["import-timm", "{tmp}/nope.pth", "--arch", "resnet18", "-o", "{out}/i.pth"],
        "no such checkpoint",
    ),  # fmt: skip
    Row(
        "weights truncated",
        ["import-timm", "{tmp}/truncated.pth", "--arch", "resnet18", "-o", "{out}/i.pth"],
        "truncated",
    ),  # fmt: skip
    Row(
        "output under a file",
        ["import-timm", "{tmp}/weights.pth", "--arch", "resnet18", "-o", "{tmp}/a-file.txt/i.pth"],
        "a-file.txt is a file",
    ),  # fmt: skip
    Row("no architecture", ["import-timm", "{tmp}/weights.pth", "-o", "{out}/i.pth"], "--arch", 2),
    Row(
        "weights of another arch",
        ["import-timm", "{tmp}/timm-resnet18.pth", "--arch", "resnet34", "-o", "{out}/i.pth"],
        "'resnet34': 96 keys differ: missing 96 (layer1.2.bn1.bias, layer1.2.bn1.num_batches_tracked, "
        "layer1.2.bn1.running_mean, ...); the keys look like resnet18, not resnet34",
    ),  # fmt: skip
    # -- finetune-det ------------------------------------------------------------------------------
    Row("weights missing", ["finetune-det", "--smoke", "--weights", "{tmp}/nope.pth"], "no such checkpoint"),
    Row("weights an image", ["finetune-det", "--smoke", "--weights", "{tmp}/photo.png"], "PNG image"),
    # -- bench and the command itself --------------------------------------------------------------
    Row("unknown subcommand", ["pretrian"], "argument command: invalid choice: 'pretrian'", 2),
    Row(
        "unknown flag",
        ["bench", "--bogus", "1", "--out", "{out}/b"],
        "unrecognized arguments: --bogus 1",
        2,
    ),
    Row("steps not a number", ["bench", "--steps", "x"], "argument --steps: invalid int value: 'x'", 2),
]
if not torch.cuda.is_available():  # on a GPU machine --device cuda is not a bad input
    ROWS.append(
        Row("cuda without a GPU", ["bench", "--device", "cuda", "--out", "{out}/b"], "no CUDA GPU", 2)
    )


def folder_digest(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative path -> sha256 of its bytes)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def fill(argv: list[str], tmp: Path, out: Path) -> list[str]:
    return [a.replace("{tmp}", str(tmp)).replace("{out}", str(out)) for a in argv]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("inputs")
    make_inputs(tmp)
    return tmp


def test_the_table_is_wide_enough() -> None:
    commands = {row.argv[0] for row in ROWS}
    assert {
        "pretrain",
        "finetune",
        "probe",
        "reconstruct",
        "export",
        "import-timm",
        "finetune-det",
    } <= commands
    assert len({row.id for row in ROWS}) == len(ROWS) >= 25  # every row its own kind of bad input


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row.id)
def test_bad_input_is_one_line_and_changes_nothing(
    row: Row, inputs: Path, tmp_path: Path, capsys, caplog
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier-result.txt").write_text("left by an earlier run\n")
    if row.setup:
        row.setup(out)
    before = folder_digest(out)
    capsys.readouterr()
    with caplog.at_level(logging.INFO):
        try:
            status = cli.main(fill(row.argv, inputs, out))
        except SystemExit as exc:  # argparse (status 2) or a one-line SystemExit("message")
            status = exc.code
    captured = capsys.readouterr()
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    if isinstance(status, str):  # what Python prints for SystemExit("message"), with status 1
        lines, status = [*lines, status], 1
    lines += [line for line in captured.err.splitlines() if line.strip()]
    assert status == row.status, lines
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert row.expect in lines[0], lines[0]
    assert "Traceback" not in captured.out + captured.err
    assert not any(r.exc_info for r in caplog.records if r.levelno >= logging.INFO)
    assert folder_digest(out) == before


REAL = [
    "config invalid YAML",
    "output_dir is a file",
    "epochs not a number",
    "unknown subcommand",
    "unknown flag",  # pretrain's and bench's
]


@pytest.mark.parametrize("row", [r for r in ROWS if r.name in REAL], ids=lambda row: row.id)
def test_the_real_command_prints_one_line(row: Row, inputs: Path, tmp_path: Path) -> None:
    """These rows fail before the model code loads: stderr holds the one line and nothing else."""
    out = tmp_path / "out"
    out.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "spark_me.cli", *fill(row.argv, inputs, out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == row.status
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and row.expect in lines[0], result.stderr
    assert result.stdout == "" and not any(out.iterdir())
