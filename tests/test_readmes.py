"""Every ```python and ```bash block of every README.md runs here as written, at small sizes.

A documentation example that drifts from the code (a renamed flag, an undefined name, a file that
is not where the text says) fails this test. How a block runs (see `Sandbox`):

- in a fresh folder, with the inputs the block names already there: `/data/images` (10 of the
  embedded photographs), `/data/set` (a generated labelled set: train/ and val/ class folders),
  `output/checkpoint-last.pth` (a ResNet-50 pretraining checkpoint),
  `resnet50_supervised.pth` (timm weights), `benchmarks/results/` (a copy of the committed ones);
  an input the block does not name is absent (a pretraining into `output/` starts afresh);
- `spark-me`, `.venv/bin/spark-me`, `python`, `python3`, `.venv/bin/python` run this interpreter
  with the repository on PYTHONPATH, and append the SHRINK flags of the command they run
  (argparse keeps an option's last value), so a documented 1600-epoch, 224-px command runs one
  epoch at 64 px. SPARK_ME_DOC_SHRINK (JSON, same shape as SHRINK) overrides them;
- bash blocks run under `bash -e -o pipefail`, python blocks as a script.

A block that cannot run here says so on one of its lines, with the reason:

    # doc-test: skip (needs a GPU)

Such blocks are counted and listed in a warning at the end of every run (never skipped silently);
the flags they pass to `spark-me` are still checked against its `--help`. New README blocks need
nothing else: they are found and run.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

from ._labelled import make_labelled_set

pytestmark = pytest.mark.heavy  # whole commands in child processes: scheduled first (conftest)

ROOT = Path(__file__).resolve().parents[1]
SKIP = re.compile(r"#\s*doc-test:\s*skip\b\s*(?:\((?P<reason>[^)]*)\))?")
# a fenced block, also indented under a list item: ```lang ... ``` with the same indent
FENCE = re.compile(
    r"^(?P<indent> *)```(?P<lang>[A-Za-z0-9_+-]*)[^\n]*\n(?P<code>.*?)^(?P=indent)```\s*$", re.M | re.S
)
LANGS = {"python": "python", "bash": "bash", "sh": "bash", "shell": "bash"}

# flags appended to each command a block runs ("spark-me SUB" or "python -m MODULE")
SHRINK: dict[str, list[str]] = {
    key: flags.split()
    for key, flags in {
        "spark-me pretrain": "--epochs 1 --input_size 64 --batch_size 4 --decoder_width 32 "
        "--num_workers 0 --repeat 1 --val_every 0 --recon_every 1 --dataflow rules",
        "spark-me bench": "--sizes 64 --steps 1 --warmup 0 --batch_size 1 --decoder_width 32",
        "spark-me reconstruct": "--input_size 64",
        "spark-me finetune": "--epochs 1 --input_size 32 --batch_size 16 --num_workers 0",
        "spark-me probe": "--epochs 1 --input_size 32 --batch_size 16 --num_workers 0",
        "python -m benchmarks.encoder": "--size 64 --batch_size 1 --repeats 1 --dataflow rules "
        "--decoder_width 32",
        "python -m benchmarks.depthwise": "--size 64 --batch_size 1 --repeats 1",
        "python -m benchmarks.profile": "--size 64 --batch_size 1 --repeat 1",
    }.items()
}
# paths that stand for the reader's own files -> where the sandbox has them
PLACEHOLDERS = {"/data/images": "data-images", "/data/set": "data-set"}


@dataclass(frozen=True)
class Block:
    readme: str  # path relative to the repository
    line: int  # of the opening fence
    lang: str  # python | bash
    code: str

    @property
    def skip_reason(self) -> str | None:
        match = SKIP.search(self.code)
        return None if match is None else (match["reason"] or "").strip()

    def __str__(self) -> str:
        return f"{self.readme}:{self.line}"


def readmes() -> list[Path]:
    """Every README.md of the repository (git's list when there is one: no .venv, no caches)."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*README.md"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        return sorted(ROOT / p for p in listed if (ROOT / p).is_file())
    except (OSError, subprocess.CalledProcessError):
        return sorted(p for p in ROOT.rglob("README.md") if ".venv" not in p.parts)


def blocks() -> list[Block]:
    found = []
    for path in readmes():
        text = path.read_text()
        for match in FENCE.finditer(text):
            lang = LANGS.get(match["lang"].lower())
            if lang:
                line = text.count("\n", 0, match.start()) + 1
                code = textwrap.dedent(match["code"])
                found.append(Block(str(path.relative_to(ROOT)), line, lang, code))
    return found


ALL = blocks()
RUNNABLE = [b for b in ALL if b.skip_reason is None]
SKIPPED = [b for b in ALL if b.skip_reason is not None]


SHIM = """#!{python}
import json, os, sys
args = sys.argv[1:]
if {spark_me!r}:
    args = ["-m", "spark_me.cli", *args]
key = None
if len(args) >= 2 and args[0] == "-m":
    key = "python -m " + args[1]
    if args[1] == "spark_me.cli":
        sub = next((a for a in args[2:] if not a.startswith("-")), "")
        key = "spark-me " + sub
extra = json.loads(os.environ["SPARK_ME_DOC_SHRINK"]).get(key, [])
os.execv({python!r}, [{python!r}, *args, *extra])
"""


class Sandbox:
    """A folder where a block runs: the examples' inputs, command shims, the environment."""

    def __init__(self, folder: Path, inputs: dict[str, Path], code: str):
        self.folder = folder
        bin_dir = folder / ".venv" / "bin"
        bin_dir.mkdir(parents=True)
        for name, spark_me in (("spark-me", True), ("python", False), ("python3", False)):
            shim = bin_dir / name
            shim.write_text(SHIM.format(python=sys.executable, spark_me=spark_me))
            shim.chmod(0o755)
        for rel, source in inputs.items():
            if rel not in code:
                continue
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                shutil.copytree(source, folder / rel)
            else:
                (folder / rel).symlink_to(source)  # a run that writes it replaces the link only
        shrink = json.loads(os.environ.get("SPARK_ME_DOC_SHRINK", "null")) or SHRINK
        self.env = {
            **os.environ,
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "SPARK_ME_DOC_SHRINK": json.dumps(shrink),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "MPLBACKEND": "Agg",
        }

    def run(self, code: str, lang: str, timeout: int = 900) -> subprocess.CompletedProcess:
        script = self.folder / ("block.py" if lang == "python" else "block.sh")
        script.write_text(code)
        cmd = (
            [sys.executable, str(script)]
            if lang == "python"
            else ["bash", "-e", "-o", "pipefail", str(script)]
        )
        return subprocess.run(
            cmd, cwd=self.folder, env=self.env, capture_output=True, text=True, timeout=timeout
        )


@pytest.fixture(scope="session")
def doc_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The files the examples name, made once per run (xdist's workers share the folder above
    their own, under a file lock): photographs, a ResNet-50 checkpoint, timm weights."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    made = (base.parent if "PYTEST_XDIST_WORKER" in os.environ else base) / "doc-inputs"
    with FileLock(f"{made}.lock"):
        if not (made / "complete").exists():
            make_doc_inputs(made)
            (made / "complete").touch()
    return {
        "data-images": made / "images",
        "data-set": made / "set",
        "output/checkpoint-last.pth": made / "checkpoint-last.pth",
        "resnet50_supervised.pth": made / "resnet50_supervised.pth",
        "benchmarks/results": ROOT / "benchmarks" / "results",
    }


def make_doc_inputs(made: Path) -> None:
    import timm
    import torch

    import converters
    from spark_me.data.images import sample_photo_paths
    from spark_me.engine.config import PretrainConfig
    from spark_me.engine.pretrain import build_model

    shutil.rmtree(made, ignore_errors=True)  # a half-made folder of an interrupted run
    images = made / "images"
    images.mkdir(parents=True)
    for path in sample_photo_paths()[:10]:
        shutil.copy(path, images / path.name)
    cfg = PretrainConfig(arch="resnet50", decoder_width=32, input_size=64)
    state = {
        "model": build_model(cfg).state_dict(),
        "optimizer": {"state": {}, "param_groups": []},
        "epoch": 0,
        "step": 0,
        "config": cfg.to_dict(),
    }
    converters.save_state(state, made / "checkpoint-last.pth")
    torch.save(timm.create_model("resnet50").state_dict(), made / "resnet50_supervised.pth")
    make_labelled_set(made / "set", train_per_class=8, val_per_class=4)


def test_readmes_have_examples_and_every_skip_gives_a_reason() -> None:
    """Lists the blocks that do not run, with their reasons, in a warning on every run."""
    assert len(readmes()) >= 5 and len(RUNNABLE) >= 7
    assert all(b.skip_reason for b in SKIPPED), [str(b) for b in SKIPPED if not b.skip_reason]
    if SKIPPED:
        warnings.warn(
            f"{len(SKIPPED)} of {len(ALL)} README blocks are not run here: "
            + "; ".join(f"{b} ({b.skip_reason})" for b in SKIPPED),
            stacklevel=1,
        )


@pytest.mark.parametrize("block", RUNNABLE, ids=str)
def test_readme_block_runs(block: Block, doc_inputs: dict[str, Path], tmp_path: Path) -> None:
    code = block.code
    for placeholder, rel in PLACEHOLDERS.items():
        code = code.replace(placeholder, str(tmp_path / rel))
    result = Sandbox(tmp_path, doc_inputs, code).run(code, block.lang)
    assert result.returncode == 0, (
        f"{block} exited {result.returncode}\n--- block ---\n{block.code}\n--- stdout ---\n"
        f"{result.stdout[-3000:]}\n--- stderr ---\n{result.stderr[-6000:]}"
    )


def command_words(code: str) -> list[list[str]]:
    """The shell words of each command line of a bash block (continuations joined, comments out)."""
    found = []
    for line in code.replace("\\\n", " ").splitlines():
        line = line.split(" #")[0]
        if line.lstrip().startswith("#"):
            continue
        try:
            found.append(shlex.split(line))
        except ValueError:
            continue
    return found


def flags_after(words: list[str], start: int) -> list[str]:
    return [w.split("=")[0] for w in words[start:] if w.startswith("--")]


def spark_me_invocations(code: str) -> list[tuple[str, list[str]]]:
    """(subcommand, its --flags) of every `spark-me SUB ...` / `-m spark_me.cli SUB ...` command."""
    found = []
    for words in command_words(code):
        for i, word in enumerate(words):
            is_cli = word.endswith("spark-me") or (word == "spark_me.cli" and i > 0 and words[i - 1] == "-m")
            if is_cli and i + 1 < len(words) and not words[i + 1].startswith("-"):
                found.append((words[i + 1], flags_after(words, i + 2)))
    return found


def module_invocations(code: str, package: str = "benchmarks") -> list[tuple[str, list[str]]]:
    """(module, its --flags) of every `python -m PACKAGE.MODULE ...` command of a block."""
    found = []
    for words in command_words(code):
        for i, word in enumerate(words[:-1]):
            if word == "-m" and words[i + 1].startswith(package + "."):
                found.append((words[i + 1], flags_after(words, i + 2)))
    return found


def subcommand_help(sub: str) -> str:
    """`spark-me SUB --help`, in this process (argparse prints it and exits 0)."""
    from spark_me import cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
        cli.main([sub, "--help"])
    assert exited.value.code == 0, sub
    return out.getvalue()


def test_every_documented_flag_is_in_its_commands_help() -> None:
    """Runnable or not, every `--flag` a README passes to a spark-me subcommand is in that
    subcommand's --help (the help lists what the README uses)."""
    wanted: dict[str, set[str]] = {}
    for block in ALL:
        if block.lang == "bash":
            for sub, flags in spark_me_invocations(block.code):
                wanted.setdefault(sub, set()).update(flags)
    assert {"pretrain", "export", "bench", "finetune-det"} <= wanted.keys()
    missing = {
        sub: sorted(f for f in flags if f not in subcommand_help(sub)) for sub, flags in wanted.items()
    }
    assert not any(missing.values()), missing


def test_every_documented_benchmark_flag_is_in_its_modules_help() -> None:
    """Runnable or not (the re-measuring blocks are skipped), every `--flag` a README passes to
    `python -m benchmarks.X` is in that module's --help, read in this process."""
    import importlib

    wanted: dict[str, set[str]] = {}
    for block in ALL:
        if block.lang == "bash":
            for module, flags in module_invocations(block.code):
                wanted.setdefault(module, set()).update(flags)
    assert {"benchmarks.encoder", "benchmarks.depthwise", "benchmarks.profile"} <= wanted.keys()
    missing = {}
    for module, flags in wanted.items():
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
            importlib.import_module(module).main(["--help"])
        assert exited.value.code == 0, module
        missing[module] = sorted(f for f in flags if f not in out.getvalue())
    assert not any(missing.values()), missing
