"""One-command set-up: virtual environment at .venv, pinned dependencies, MinkowskiEngine, then a job.

    python3 -m spark_me.bootstrap pretrain [args...]   # the main job
    python3 -m spark_me.bootstrap test [pytest args...] # the test suite
    python3 -m spark_me.bootstrap finetune-det [args...] # Detectron2 fine-tuning (detection/)
    python3 -m spark_me.bootstrap setup [--no-detectron2]|lint|format|smoke

MinkowskiEngine is built with CUDA when a GPU and nvcc are present (SPARK_ME_CUDA=1 forces it, e.g.
in a Docker build without GPU, for TORCH_CUDA_ARCH_LIST; SPARK_ME_CUDA=0 forces the CPU build).

Standard library only, so that it runs with the machine's bare python3 before anything is
installed. Every step is skipped when already done (dependency stamp, cached ME wheel), so a second
run starts the job within seconds.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from spark_me._build import detectron2, minkowski
from spark_me._build.fetch import BuildError

log = logging.getLogger("spark_me.bootstrap")

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("SPARK_ME_VENV", ROOT / ".venv"))
EXTRAS = os.environ.get("SPARK_ME_EXTRAS", "pinned,build,dev")
DEPS_STAMP = "spark-me-deps.sha256"
MIN_PYTHON = (3, 11)


def venv_python() -> Path:
    return VENV / "bin" / "python"


def ensure_venv() -> None:
    if venv_python().exists():
        return
    log.info("creating virtual environment %s", VENV)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)


def deps_fingerprint() -> str:
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes())
    digest.update(EXTRAS.encode())
    return digest.hexdigest()


def ensure_deps() -> None:
    """pip install -e .[extras] once per pyproject/extras change (pip's no-op resolve alone is slow)."""
    stamp = VENV / DEPS_STAMP
    fingerprint = deps_fingerprint()
    if stamp.exists() and stamp.read_text().strip() == fingerprint:
        log.info("dependencies up to date (%s)", VENV)
        return
    log.info("installing spark-me[%s] into %s (torch is large: a few minutes the first time)", EXTRAS, VENV)
    started = time.monotonic()
    python = str(venv_python())
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--upgrade", "pip"], check=True)
    subprocess.run([python, "-m", "pip", "install", "--quiet", "-e", f"{ROOT}[{EXTRAS}]"], check=True)
    stamp.write_text(fingerprint)
    log.info("dependencies installed in %.0f s", time.monotonic() - started)


def want_cuda() -> tuple[bool, str | None]:
    """Build ME with CUDA? SPARK_ME_CUDA=1/0 decides; unset: when the venv's torch sees a GPU and
    nvcc exists (then for that GPU's architecture unless TORCH_CUDA_ARCH_LIST says otherwise)."""
    flag = os.environ.get("SPARK_ME_CUDA", "").strip().lower()
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST") or None
    if flag in ("1", "true", "yes", "on"):
        return True, arch_list
    if flag in ("0", "false", "no", "off"):
        return False, None
    code = (
        "import torch; "
        "print('%d.%d' % torch.cuda.get_device_capability() if torch.cuda.is_available() else '')"
    )
    out = subprocess.run([str(venv_python()), "-c", code], capture_output=True, text=True)
    gpu_arch = out.stdout.strip() if out.returncode == 0 else ""
    if not gpu_arch:
        return False, None
    if not (os.environ.get("CUDA_HOME") or shutil.which("nvcc")):
        log.warning("a GPU is visible but nvcc is not: building MinkowskiEngine for the CPU only "
                    "(install the CUDA toolkit or set CUDA_HOME, then re-run)")  # fmt: skip
        return False, None
    log.info("GPU (sm %s) and nvcc found: building MinkowskiEngine with CUDA", gpu_arch)
    return True, arch_list or gpu_arch


def setup(with_detectron2: bool = False) -> None:
    if sys.version_info < MIN_PYTHON:
        raise SystemExit(
            f"spark-me needs Python >= {'.'.join(map(str, MIN_PYTHON))}; this is {sys.version.split()[0]}. "
            "Run the command with a newer python3."
        )
    ensure_venv()
    ensure_deps()
    cuda, arch_list = want_cuda()
    minkowski.ensure_minkowski(str(venv_python()), cuda=cuda, arch_list=arch_list)
    if with_detectron2:  # optional extra: the tests and the fine-tuning need it, pretraining does not
        detectron2.ensure_detectron2(str(venv_python()))


def run_in_venv(args: list[str]) -> int:
    log.info("running: %s", " ".join(args))
    return subprocess.run([str(venv_python()), *args], cwd=ROOT).returncode


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="[spark-me] %(message)s")
    command, rest = (argv[0], argv[1:]) if argv else ("help", [])
    jobs = {
        "pretrain": ["-m", "spark_me.cli", "pretrain", *rest],
        "finetune-det": ["-m", "spark_me.cli", "finetune-det", *rest],
        "smoke": ["-m", "spark_me.cli", "smoke", *rest],
        "test": ["-m", "pytest", *rest],
        "lint": ["-m", "ruff", "check", ".", *rest],
        "format": ["-m", "ruff", "format", ".", *rest],
        "setup": None,
    }
    if command not in jobs:
        print(__doc__)
        return 0 if command in ("help", "-h", "--help") else 2
    if command == "setup" and "--no-detectron2" in rest:  # e.g. the Docker image's optional step
        rest.remove("--no-detectron2")
        with_detectron2 = False
    else:
        with_detectron2 = command in ("test", "setup", "finetune-det")
    try:
        setup(with_detectron2=with_detectron2)
    except BuildError as err:
        log.error("error: %s", err)
        return 1
    except subprocess.CalledProcessError as err:
        log.error("error: set-up step failed (exit %d): %s", err.returncode, " ".join(map(str, err.cmd)))
        return 1
    if jobs[command] is None:
        return 0
    if command == "test":  # detection tests must run here, not skip
        os.environ["SPARK_ME_REQUIRE_DETECTRON2"] = "1"
    return run_in_venv(jobs[command])


if __name__ == "__main__":
    sys.exit(main())
