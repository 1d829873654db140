"""One-command set-up: virtual environment at .venv, pinned dependencies, MinkowskiEngine, then a job.

    python3 -m spark_me.bootstrap pretrain [args...]   # the main job
    python3 -m spark_me.bootstrap test [pytest args...] # the test suite
    python3 -m spark_me.bootstrap finetune-det [args...] # Detectron2 fine-tuning (detection/)
    python3 -m spark_me.bootstrap setup [--no-detectron2]|lint|format|smoke
    python3 -m spark_me.bootstrap bundle DIR [--python-version 3.12] [--torch system|pinned] ...
    python3 -m spark_me.bootstrap gpu-check --out DIR [--offline DIR] [--system-torch]

Install options (any command that sets up; removed before the job's own arguments):
    --offline DIR    install from a bundle made by `bundle` only, never from an index
    --system-torch   use this interpreter's own torch (supported: torch >=2.4,<2.15) instead of the
                     pin: a venv that sees this interpreter's packages, torch is never reinstalled
    --no-venv        install into this interpreter itself instead of .venv (with --system-torch)

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
import re
import shutil
import site
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from spark_me._build import detectron2, minkowski
from spark_me._build.fetch import BuildError

log = logging.getLogger("spark_me.bootstrap")

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("SPARK_ME_VENV", ROOT / ".venv"))
EXTRAS = os.environ.get("SPARK_ME_EXTRAS", "pinned,build,dev")
DEPS_STAMP = "spark-me-deps.sha256"
MIN_PYTHON = (3, 11)
# --system-torch accepts these torch releases: >= the oldest that pyproject allows, below the first
# release nobody has tried. Tested: 2.14.1 (CPU, this project's pin); 2.11.0+cu130 is the GPU nodes'.
SUPPORTED_TORCH = ((2, 4), (2, 15))
SUPPORTED_TORCH_TEXT = ">=2.4,<2.15"
SYSTEM_PTH = "_spark_me_system_site.pth"
INDEX_VARS = ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_CONSTRAINT")


@dataclass(frozen=True)
class Install:
    """How the environment is made: from an index or a bundle, with the pinned or the system torch."""

    offline: Path | None = None  # a bundle folder: install from it only
    system_torch: bool = False  # use the running interpreter's torch
    no_venv: bool = False  # install into the running interpreter itself


ONLINE = Install()  # the default: .venv, pinned torch, from the package index


def parse_install_options(args: list[str]) -> tuple[Install, list[str]]:
    """Take --offline DIR / --system-torch / --no-venv out of a command's arguments."""
    rest, offline, system_torch, no_venv = [], None, False, False
    it = iter(args)
    for arg in it:
        if arg == "--offline":
            value = next(it, None)
            if value is None:
                raise SystemExit("error: --offline needs a bundle folder (see `bootstrap bundle`)")
            offline = Path(value).resolve()
        elif arg.startswith("--offline="):
            offline = Path(arg.split("=", 1)[1]).resolve()
        elif arg == "--system-torch":
            system_torch = True
        elif arg == "--no-venv":
            no_venv = True
        else:
            rest.append(arg)
    if no_venv and not system_torch:
        raise SystemExit("error: --no-venv installs into this interpreter and needs --system-torch")
    return Install(offline, system_torch, no_venv), rest


def venv_python(install: Install = ONLINE) -> Path:
    return Path(sys.executable) if install.no_venv else VENV / "bin" / "python"


def stamp_dir(install: Install = ONLINE) -> Path:
    return Path(sys.prefix) if install.no_venv else VENV


def system_torch_version(python: str) -> tuple[str, str]:
    """(torch, torchvision) versions of `python`; a BuildError if torch is missing or unsupported."""
    # the distributions' versions (what pip compares; torch.__version__ may add a local +cu130)
    code = (
        "import importlib.metadata as m, torch; v = m.version('torch')\n"
        "try: tv = m.version('torchvision')\nexcept m.PackageNotFoundError: tv = ''\nprint(v, tv)"
    )
    out = subprocess.run([python, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        raise BuildError(
            f"--system-torch: {python} cannot import torch; install torch there or drop the flag"
        )
    torch_version, _, vision_version = out.stdout.strip().splitlines()[-1].partition(" ")
    check_torch_range(torch_version, python)
    return torch_version, vision_version.strip()


def check_torch_range(version: str, python: str) -> None:
    match = re.match(r"(\d+)\.(\d+)", version)
    low, high = SUPPORTED_TORCH
    if not match or not low <= (int(match.group(1)), int(match.group(2))) < high:
        raise BuildError(
            f"torch {version} in {python} is outside the supported range {SUPPORTED_TORCH_TEXT}: "
            "use an interpreter with a supported torch, or drop --system-torch for the pinned one"
        )


def ensure_venv(install: Install = ONLINE) -> None:
    if install.no_venv:
        return
    if not venv_python().exists():
        log.info("creating virtual environment %s", VENV)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    if install.system_torch:
        link_system_site()


def link_system_site() -> None:
    """Make this interpreter's packages (its torch above all) visible in the venv, behind the venv's own.

    A .pth line `site.addsitedir(...)`, not `venv --system-site-packages`: when this interpreter is
    itself a venv (e.g. /opt/torch/.venv on the GPU nodes) the latter would show the *base*
    interpreter's packages, not this one's, and addsitedir also honours the .pth files found there.
    """
    dirs = [d for d in site.getsitepackages() if Path(d).is_dir()]
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    purelib = subprocess.run([str(venv_python()), "-c", code], check=True, capture_output=True, text=True)
    pth = Path(purelib.stdout.strip()) / SYSTEM_PTH
    # one `import` line, run by site.py in a scope that a comprehension could not see `site` from
    pth.write_text(f"import site; list(map(site.addsitedir, {dirs!r}))\n")
    log.info("venv %s sees the packages of %s (%s)", VENV, sys.executable, ", ".join(dirs))


def effective_extras(install: Install, manifest: dict | None) -> str:
    """The extras to install: SPARK_ME_EXTRAS, less `pinned` with the system torch; with a bundle,
    its extras unless SPARK_ME_EXTRAS asks for a subset of them."""
    if manifest is None:
        wanted = EXTRAS.split(",")
    else:
        available = manifest["extras"] + (["pinned"] if manifest["torch"] == "pinned" else [])
        wanted = EXTRAS.split(",") if "SPARK_ME_EXTRAS" in os.environ else available
        missing = [
            e for e in wanted if e and e not in available and not (e == "pinned" and install.system_torch)
        ]
        if missing:
            raise BuildError(f"the bundle has no extra {', '.join(missing)} (it has {', '.join(available)})")
    return ",".join(e for e in wanted if e and not (install.system_torch and e == "pinned"))


def offline_env() -> dict:
    """pip settings that reach nothing but the bundle: no config files, no index variables."""
    env = {k: v for k, v in os.environ.items() if k not in INDEX_VARS}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1")
    return env


def deps_fingerprint(install: Install = ONLINE, extras: str | None = None, salt: str = "") -> str:
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes())
    digest.update((EXTRAS if extras is None else extras).encode())
    if install != ONLINE or salt:
        digest.update(repr((install.system_torch, install.no_venv, salt)).encode())
    return digest.hexdigest()


def ensure_deps(install: Install = ONLINE, manifest: dict | None = None) -> None:
    """pip install -e .[extras] once per pyproject/extras change (pip's no-op resolve alone is slow)."""
    python = str(venv_python(install))
    extras = effective_extras(install, manifest)
    cmd = [python, "-m", "pip", "install", "--quiet"]
    salt, env = "", None
    if install.system_torch:
        torch_version, vision_version = system_torch_version(python)
        salt = f"torch {torch_version} {vision_version}"
        constraints = stamp_dir(install) / "spark-me-system-torch.txt"
        pins = [f"torch=={torch_version}"] + ([f"torchvision=={vision_version}"] if vision_version else [])
        constraints.write_text("\n".join(pins) + "\n")
        cmd += ["-c", str(constraints)]  # pip may not replace the system torch
    if install.offline is not None:
        salt += " offline " + str(manifest["files"])
        cmd += ["--no-index", "--find-links", str(install.offline / "wheels")]
        env = offline_env()
    stamp = stamp_dir(install) / DEPS_STAMP
    fingerprint = deps_fingerprint(install, extras, salt)
    if stamp.exists() and stamp.read_text().strip() == fingerprint:
        log.info("dependencies up to date (%s)", stamp.parent)
        return
    source = f"bundle {install.offline}" if install.offline else "the package index"
    log.info("installing spark-me[%s] into %s from %s", extras, stamp.parent, source)
    started = time.monotonic()
    if install.offline is None and not install.no_venv:
        subprocess.run([python, "-m", "pip", "install", "--quiet", "--upgrade", "pip"], check=True)
    subprocess.run([*cmd, "-e", f"{ROOT}[{extras}]" if extras else str(ROOT)], check=True, env=env)
    stamp.write_text(fingerprint)
    log.info("dependencies installed in %.0f s", time.monotonic() - started)


def want_cuda(install: Install = ONLINE) -> tuple[bool, str | None]:
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
    out = subprocess.run([str(venv_python(install)), "-c", code], capture_output=True, text=True)
    gpu_arch = out.stdout.strip() if out.returncode == 0 else ""
    if not gpu_arch:
        return False, None
    if not (os.environ.get("CUDA_HOME") or shutil.which("nvcc")):
        log.warning("a GPU is visible but nvcc is not: building MinkowskiEngine for the CPU only "
                    "(install the CUDA toolkit or set CUDA_HOME, then re-run)")  # fmt: skip
        return False, None
    log.info("GPU (sm %s) and nvcc found: building MinkowskiEngine with CUDA", gpu_arch)
    return True, arch_list or gpu_arch


def open_bundle(install: Install) -> dict | None:
    """The bundle's checked manifest, after checking that it fits this interpreter and torch mode."""
    if install.offline is None:
        return None
    from spark_me._build import bundle  # tomllib: only after the Python version check

    manifest = bundle.load(install.offline)
    here = "{}.{}".format(*sys.version_info[:2])
    if manifest["python_version"] != here:
        raise BuildError(
            f"bundle {install.offline} is for Python {manifest['python_version']}; this is {here}"
        )
    if manifest["torch"] == "system" and not install.system_torch:
        raise BuildError(
            f"bundle {install.offline} has no torch (made with --torch system): add --system-torch "
            "to use this interpreter's torch"
        )
    bundle.seed_cache(install.offline, manifest)
    return manifest


def setup(with_detectron2: bool = False, install: Install = ONLINE, need_detectron2: bool = False) -> None:
    """Environment, dependencies, ME and (optionally) Detectron2, each skipped when already done."""
    if sys.version_info < MIN_PYTHON:
        raise SystemExit(
            f"spark-me needs Python >= {'.'.join(map(str, MIN_PYTHON))}; this is {sys.version.split()[0]}. "
            "Run the command with a newer python3."
        )
    if install.system_torch:
        system_torch_version(sys.executable)  # refuse an unsupported torch before making anything
    manifest = open_bundle(install)
    ensure_venv(install)
    ensure_deps(install, manifest)
    python = str(venv_python(install))
    cuda, arch_list = want_cuda(install)
    minkowski.ensure_minkowski(python, cuda=cuda, arch_list=arch_list)
    if not with_detectron2:  # optional extra: the tests and the fine-tuning need it, pretraining does not
        return
    if manifest is None:
        detectron2.ensure_detectron2(python)
        return
    from spark_me._build import bundle

    wheel = bundle.detectron2_wheel(install.offline, manifest)
    if wheel is None and need_detectron2:
        raise BuildError(f"bundle {install.offline} has no Detectron2 (make it with `bundle --detectron2`)")
    if wheel is None:
        log.info("bundle has no Detectron2: not installed (make the bundle with --detectron2 for it)")
        return
    options = ("--no-index", "--find-links", str(install.offline / "wheels"))
    detectron2.ensure_detectron2(python, wheel=wheel, pip_options=options, env=offline_env())


def parallel_test_args(install: Install = ONLINE) -> list[str]:
    """pytest-xdist flags: one worker per core (at most 4; each imports torch, ME and timm, ~1 GB),
    `--dist worksteal`: tests/conftest.py orders the tests so that each worker's initial share
    starts with its part of the `heavy` tests, and a worker that runs dry takes the tail of
    another's queue. Measured from a fresh clone on 2 cores (AMD EPYC): with `--dist load` every
    heavy test went to one worker (621 s busy against the other's 391 s, 10 min 31 s in all).
    3 workers cost more CPU than the gaps they fill (19.6 against 14.1 user CPU-min). None where
    xdist is absent (e.g. a GPU node's system packages) or there is one core; a later `-n 0` in
    the user's arguments turns it off (argparse keeps the last value). tests/conftest.py gives
    each worker its share of the cores."""
    workers = min(os.cpu_count() or 1, 4)
    if workers < 2:
        return []
    probe = subprocess.run([str(venv_python(install)), "-c", "import xdist"], capture_output=True)
    return ["-n", str(workers), "--dist", "worksteal"] if probe.returncode == 0 else []


# glibc's mmap and trim thresholds at 1 GiB (see benchmarks/README.md, "bench's dense row")
GLIBC_TUNABLES = "glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=1073741824"


def run_in_venv(args: list[str], install: Install = ONLINE) -> int:
    log.info("running: %s", " ".join(args))
    return subprocess.run([str(venv_python(install)), *args], cwd=ROOT).returncode


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="[spark-me] %(message)s")
    command, rest = (argv[0], argv[1:]) if argv else ("help", [])
    if command == "bundle":
        from spark_me._build import bundle

        return bundle.main(rest)
    if command == "gpu-check":
        from spark_me._build import gpu_check

        return gpu_check.main(rest)
    try:
        install, rest = parse_install_options(rest) if command != "help" else (ONLINE, rest)
    except SystemExit as err:
        log.error("%s", err)
        return 2
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
        setup(with_detectron2=with_detectron2, install=install, need_detectron2=command != "setup")
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
        # glibc serves allocations above its mmap threshold (at most 32 MB by default) with fresh
        # mmaps whose pages the kernel zero-fills on every use: the suite's processes (pytest's
        # workers and the commands they start) took 31 M minor page faults and 132 s of system
        # time in a run; with these thresholds 19 M and 104 s, 8:10 instead of 8:22 (2 cores).
        # Only the allocator's bookkeeping changes; a value the user set wins.
        os.environ.setdefault("GLIBC_TUNABLES", GLIBC_TUNABLES)
        return run_in_venv(["-m", "pytest", *parallel_test_args(install), *rest], install)
    return run_in_venv(jobs[command], install)


if __name__ == "__main__":
    sys.exit(main())
