"""Reproducible, cached build of MinkowskiEngine 0.5.4 for a given Python interpreter.

ME exists on PyPI only as a 2021 source distribution that does not build on a modern stack as is.
This module owns that step: fetch the sdist by name from the package index (hash-checked), apply
this project's patch files, build a wheel once, and cache it outside the repo under a key made of
(python tag, torch version, CUDA/arch, BLAS when not the system's, patch-set hash). A warm cache
makes the step take seconds. The CPU kernels' BLAS is the system OpenBLAS, else PyPI's
scipy-openblas32 wheel in the target interpreter (SPARK_ME_BLAS=auto|system|wheel; see choose_blas).

Standard library only: it runs before the virtual environment has anything installed, and it asks
the *target* interpreter (the venv's python) for its torch version instead of importing torch.

    python -m spark_me._build.minkowski [--python .venv/bin/python] [--cuda] [--arch "8.0;9.0"]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from spark_me._build.fetch import BuildError, cache_root, fetch_by_name, run_step

log = logging.getLogger("spark_me.build")

ME_VERSION = "0.5.4"
SDIST_NAME = f"MinkowskiEngine-{ME_VERSION}.tar.gz"
SDIST_SHA256 = "b1879c00d0b0b1d30ba622cce239886a7e3c78ee9da1064cdfe2f64c2ab15f94"
PATCH_DIR = Path(__file__).parent / "patches" / f"minkowskiengine-{ME_VERSION}"
# Applied on top for CUDA builds only (they touch .cu/.cuh files), so CPU wheel keys do not change.
CUDA_PATCH_DIR = Path(__file__).parent / "patches" / f"minkowskiengine-{ME_VERSION}-cuda"
# Applied only when linking the scipy-openblas32 wheel, so wheels for a system OpenBLAS keep their keys.
BLAS_WHEEL_PATCH_DIR = Path(__file__).parent / "patches" / f"minkowskiengine-{ME_VERSION}-scipy-openblas"
SYSTEM_BLAS = "openblas"  # ME_BLAS value: the system's libopenblas.so and cblas.h
WHEEL_BLAS = "scipy-openblas"  # ME_BLAS value: PyPI's scipy-openblas32 wheel in the target interpreter
BLAS_WHEEL_PROJECT = "scipy-openblas32"
DEFAULT_ARCH_LIST = "8.0;8.6;9.0"  # A100, A10/RTX 30xx, H100/H200
BUILD_STAMP = "spark-me-minkowski-build.json"  # written into the target's sys.prefix


def patch_files(cuda: bool = False, blas: str = SYSTEM_BLAS) -> list[Path]:
    """The patch series for a build: common ones, then CUDA-only ones, then the BLAS-wheel one."""
    patches = sorted(PATCH_DIR.glob("*.patch"))
    if not patches:
        raise BuildError(f"no patch files found in {PATCH_DIR}")
    if cuda:
        patches += sorted(CUDA_PATCH_DIR.glob("*.patch"))
    if blas == WHEEL_BLAS:
        patches += sorted(BLAS_WHEEL_PATCH_DIR.glob("*.patch"))
    return patches


def patch_reason(patch: Path) -> str:
    """Each patch starts with a 'Reason: ...' line that says why it exists."""
    first = patch.read_text().splitlines()[0]
    if not first.startswith("Reason: "):
        raise BuildError(f"{patch.name} must start with a 'Reason: ...' line")
    return first[len("Reason: ") :]


def patch_set_hash(cuda: bool = False, blas: str = SYSTEM_BLAS) -> str:
    digest = hashlib.sha256()
    for patch in patch_files(cuda, blas):
        digest.update(patch.name.encode() + b"\0" + patch.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


@dataclass(frozen=True)
class Target:
    """What the wheel is tied to: the interpreter, its torch, and the CUDA flavour built."""

    python: str  # path of the interpreter that will import ME
    python_tag: str  # e.g. cp311
    torch: str  # e.g. 2.14.1+cu130
    cuda: str | None  # CUDA version to build for (None: CPU only)
    arch_list: str | None  # TORCH_CUDA_ARCH_LIST for CUDA builds
    blas: str = SYSTEM_BLAS  # SYSTEM_BLAS or WHEEL_BLAS: which library the extension links

    @property
    def key(self) -> str:
        """Names all the wheel is tied to. The BLAS appears only when it is the wheel's, so keys of
        system-OpenBLAS builds are what they were before the wheel fallback existed."""
        flavour = "cpu" if self.cuda is None else f"cu{self.cuda}-sm{self.arch_list}"
        if self.blas != SYSTEM_BLAS:
            flavour += f"-{self.blas}"
        flavour = re.sub(r"[^A-Za-z0-9.+_-]", "_", flavour)
        patches = patch_set_hash(cuda=self.cuda is not None, blas=self.blas)
        return f"me{ME_VERSION}-{self.python_tag}-torch{self.torch}-{flavour}-patches{patches}"


def probe_target(python: str, cuda: bool, arch_list: str | None) -> Target:
    """Ask the target interpreter (not this one) which torch it has."""
    code = (
        "import json, sys, torch;"
        "print(json.dumps({'tag': 'cp%d%d' % sys.version_info[:2], 'torch': torch.__version__,"
        " 'cuda': torch.version.cuda}))"
    )
    try:
        out = subprocess.run([python, "-c", code], check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as err:
        raise BuildError(
            f"{python} cannot import torch; install torch before building ME:\n{err.stderr}"
        ) from err
    info = json.loads(out.stdout.strip().splitlines()[-1])
    if cuda and not info["cuda"]:
        raise BuildError(f"--cuda asked for, but torch {info['torch']} in {python} has no CUDA")
    if cuda and not arch_list:
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCH_LIST
    return Target(
        python=python,
        python_tag=info["tag"],
        torch=info["torch"],
        cuda=info["cuda"] if cuda else None,
        arch_list=arch_list if cuda else None,
        blas=choose_blas(),
    )


def fetch_sdist(cache: Path) -> Path:
    """The ME sdist, downloaded by name from the package index and checked against its sha256."""
    return fetch_by_name("minkowskiengine", SDIST_NAME, SDIST_SHA256, cache / "sdist" / SDIST_NAME)


def unpack_and_patch(sdist: Path, workdir: Path, cuda: bool = False, blas: str = SYSTEM_BLAS) -> Path:
    with tarfile.open(sdist) as tar:
        extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(workdir, **extra)
    src = workdir / f"MinkowskiEngine-{ME_VERSION}"
    patch_tool = shutil.which("patch")
    for patch in patch_files(cuda, blas):
        log.info("patch %s: %s", patch.name, patch_reason(patch))
        if patch_tool:
            cmd = [patch_tool, "-p1", "--forward", "--batch", "--silent", "-i", str(patch)]
        else:
            cmd = ["git", "apply", "-p1", str(patch)]
        result = subprocess.run(cmd, cwd=src, capture_output=True, text=True)
        if result.returncode != 0:
            raise BuildError(f"patch {patch.name} does not apply:\n{result.stdout}{result.stderr}")
    return src


def choose_blas() -> str:
    """Which BLAS the ME build links: SPARK_ME_BLAS=auto (default), system or wheel.

    auto takes the system OpenBLAS when its header and library are there (what the existing cached
    wheels link), else PyPI's scipy-openblas32 wheel: it needs no root, no apt and no network when
    the offline bundle carries it, and it lives in the target's site-packages, not in the OS.
    """
    choice = os.environ.get("SPARK_ME_BLAS", "auto").strip().lower() or "auto"
    if choice not in ("auto", "system", "wheel"):
        raise BuildError(f"SPARK_ME_BLAS must be auto, system or wheel, not {choice!r}")
    if choice == "wheel":
        return WHEEL_BLAS
    if choice == "system" or _has_openblas() or not sys.platform.startswith("linux"):
        return SYSTEM_BLAS  # off Linux the wheel's $ORIGIN rpath does not apply
    return WHEEL_BLAS


def ensure_blas(target: Target) -> None:
    """Make the BLAS that `target.blas` names available to the build, or say how to get it."""
    if target.blas == WHEEL_BLAS:
        ensure_blas_wheel(target.python)
        return
    if not _has_openblas():
        raise BuildError(
            "OpenBLAS (cblas.h and libopenblas.so) is needed to build ME: apt-get install -y "
            "libopenblas-dev (conda: openblas), or on Linux leave SPARK_ME_BLAS unset "
            "to link the scipy-openblas32 wheel"
        )


def ensure_blas_wheel(python: str) -> str:
    """scipy-openblas32 in the target interpreter (installed by the `build` extra; else pip-installed
    here, which needs the index): returns its library folder. The ME build imports it from there."""
    code = "import scipy_openblas32 as s; print(s.get_lib_dir())"
    found = subprocess.run([python, "-c", code], capture_output=True, text=True)
    if found.returncode != 0:
        log.info("installing %s into %s: the BLAS of ME's CPU kernels", BLAS_WHEEL_PROJECT, python)
        cmd = [python, "-m", "pip", "install", "--quiet", BLAS_WHEEL_PROJECT]
        pip = subprocess.run(cmd, capture_output=True, text=True)
        found = subprocess.run([python, "-c", code], capture_output=True, text=True)
        if found.returncode != 0:
            why = (pip.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise BuildError(
                f"ME needs a BLAS: {BLAS_WHEEL_PROJECT} is not in {python} and pip could not install it "
                f"({why}); install spark-me[build] (an offline bundle carries it) or libopenblas-dev"
            )
    return found.stdout.strip().splitlines()[-1]


def _has_openblas() -> bool:
    include_dirs = [Path("/usr/include"), *Path("/usr/include").glob("*-linux-gnu")]
    if os.environ.get("CONDA_PREFIX"):
        include_dirs.append(Path(os.environ["CONDA_PREFIX"]) / "include")
    has_header = any((d / "cblas.h").exists() for d in include_dirs)
    lib_dirs = [Path("/usr/lib"), Path("/lib"), *Path("/usr/lib").glob("*-linux-gnu")]
    if os.environ.get("CONDA_PREFIX"):
        lib_dirs.append(Path(os.environ["CONDA_PREFIX"]) / "lib")
    has_lib = any((d / "libopenblas.so").exists() for d in lib_dirs)
    return has_header and has_lib


def _heartbeat(logfile: Path, started: float, done: threading.Event) -> None:
    """Long builds show progress: elapsed time and the source file being compiled."""
    while not done.wait(30):
        current = ""
        try:
            tail = logfile.read_text(errors="replace")[-65536:]
            steps = re.findall(r"\[(\d+)/(\d+)\] \S+ .*?(\w+\.(?:cpp|cu))\b", tail)
            if steps:
                done_n, total, name = steps[-1]
                current = f", ninja step {done_n}/{total} ({name})"
        except OSError:
            pass
        log.info("  ... %d s elapsed%s", time.monotonic() - started, current)


def cuda_home() -> Path:
    """The toolkit root: $CUDA_HOME, else where `nvcc` really lives (wrapper scripts are followed)."""
    if os.environ.get("CUDA_HOME"):
        return Path(os.environ["CUDA_HOME"])
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise BuildError("a CUDA build needs nvcc: install the CUDA toolkit or set CUDA_HOME")
    real = Path(nvcc).resolve()
    text = real.read_bytes()[:4096]
    if text.startswith(b"#!"):  # e.g. `exec /usr/local/cuda-13.0/bin/nvcc "$@"`
        if found := re.search(rb"(/\S+)/bin/nvcc", text):
            return Path(found.group(1).decode())
    return real.parent.parent


def build_wheel(target: Target, src: Path, outdir: Path, logfile: Path) -> Path:
    jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
    env = dict(os.environ, MAX_JOBS=jobs, ME_BLAS=os.environ.get("ME_BLAS", SYSTEM_BLAS))
    conda = os.environ.get("CONDA_PREFIX")
    if target.blas == WHEEL_BLAS:  # the patched setup.py takes the dirs from the wheel itself
        env["ME_BLAS"] = WHEEL_BLAS
        for name in ("ME_BLAS_INCLUDE_DIRS", "ME_BLAS_LIBRARY_DIRS"):
            env.pop(name, None)
    elif conda and (Path(conda) / "include" / "cblas.h").exists():  # conda's openblas, not Debian's
        env.setdefault("ME_BLAS_INCLUDE_DIRS", f"{conda}/include")
        env.setdefault("ME_BLAS_LIBRARY_DIRS", f"{conda}/lib")
    if target.cuda is None:
        env["ME_CPU_ONLY"] = "1"
        estimate = f"~6 min on 2 cores, {jobs} jobs"
    else:
        env.update(ME_FORCE_CUDA="1", TORCH_CUDA_ARCH_LIST=target.arch_list or "")
        env.setdefault("CUDA_HOME", str(cuda_home()))
        estimate = f"~1 CPU-hour per arch ({target.arch_list}), {jobs} jobs"
    log.info("building ME %s wheel for %s (%s); log: %s", ME_VERSION, target.key, estimate, logfile)
    cmd = [
        target.python,
        "-m",
        "pip",
        "wheel",
        "-v",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        str(outdir),
        str(src),
    ]
    started = time.monotonic()
    done = threading.Event()
    watcher = threading.Thread(target=_heartbeat, args=(logfile, started, done), daemon=True)
    with open(logfile, "w") as fh:
        watcher.start()
        try:
            result = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        finally:
            done.set()
    if result.returncode != 0:
        tail = logfile.read_text(errors="replace")[-3000:]
        raise BuildError(f"ME build failed (exit {result.returncode}); end of {logfile}:\n{tail}")
    wheels = [w for w in outdir.glob("*.whl") if w.name.lower().startswith("minkowskiengine-")]
    if len(wheels) != 1:
        raise BuildError(f"expected one wheel in {outdir}, found {wheels}")
    log.info("built %s in %.0f s", wheels[0].name, time.monotonic() - started)
    return wheels[0]


def cached_wheel(target: Target) -> Path | None:
    wheels = sorted((cache_root() / "wheels" / target.key).glob("[mM]inkowski[eE]ngine-*.whl"))
    return wheels[0] if wheels else None


def ensure_wheel(target: Target) -> Path:
    """The cached wheel for this target, building it (atomically) if absent."""
    wheel = cached_wheel(target)
    if wheel:
        return wheel
    cache = cache_root()
    ensure_blas(target)
    sdist = fetch_sdist(cache)
    final = cache / "wheels" / target.key
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="me-build-", dir=final.parent) as tmp:
        tmpdir = Path(tmp)
        src = unpack_and_patch(sdist, tmpdir / "src", cuda=target.cuda is not None, blas=target.blas)
        outdir = tmpdir / "wheel"
        outdir.mkdir()
        logfile = cache / "logs" / f"{target.key}.log"
        logfile.parent.mkdir(parents=True, exist_ok=True)
        wheel = build_wheel(target, src, outdir, logfile)
        (outdir / "build-info.json").write_text(json.dumps(target.__dict__ | {"key": target.key}, indent=1))
        outdir.replace(final)  # atomic: a half-built wheel never looks cached
    return final / wheel.name


def installed_key(python: str) -> str | None:
    code = f"import sys, pathlib; p = pathlib.Path(sys.prefix) / {BUILD_STAMP!r}; print(p.read_text() if p.exists() else '')"
    out = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return out.stdout.strip() or None


def install(target: Target, wheel: Path) -> None:
    if target.blas == WHEEL_BLAS:  # a cached wheel may go into a fresh venv: it loads this at import
        ensure_blas_wheel(target.python)
    log.info("installing %s into %s", wheel.name, target.python)
    subprocess.run(
        [target.python, "-m", "pip", "install", "--quiet", "--no-deps", "--force-reinstall", str(wheel)],
        check=True,
    )
    code = f"import sys, pathlib; pathlib.Path(sys.prefix, {BUILD_STAMP!r}).write_text({target.key!r})"
    subprocess.run([target.python, "-c", code], check=True)


def check_import(python: str) -> str:
    code = "import MinkowskiEngine as ME; print(ME.__version__)"
    out = subprocess.run([python, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        raise BuildError(f"MinkowskiEngine does not import in {python}:\n{out.stderr[-3000:]}")
    return out.stdout.strip()


def ensure_minkowski(python: str, cuda: bool = False, arch_list: str | None = None) -> Target:
    """Make `import MinkowskiEngine` work in `python`, building at most once per target key."""
    target = probe_target(python, cuda, arch_list)
    if installed_key(python) == target.key:
        check_import(python)
        log.info("MinkowskiEngine %s already installed (%s)", ME_VERSION, target.key)
        return target
    wheel = cached_wheel(target)
    if wheel:
        log.info("using cached ME wheel %s", wheel)
    else:
        wheel = ensure_wheel(target)
    install(target, wheel)
    log.info("MinkowskiEngine %s ready (%s)", check_import(python), target.key)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--python", default=sys.executable, help="interpreter to install ME into")
    parser.add_argument("--cuda", action="store_true", help="build the CUDA extension (needs nvcc)")
    parser.add_argument("--arch", default=None, help=f'TORCH_CUDA_ARCH_LIST (default "{DEFAULT_ARCH_LIST}")')
    parser.add_argument("--wheel-only", action="store_true", help="build/cache the wheel, do not install")
    args = parser.parse_args(argv)
    if args.wheel_only:
        return run_step(lambda: print(ensure_wheel(probe_target(args.python, args.cuda, args.arch))))
    return run_step(lambda: ensure_minkowski(args.python, args.cuda, args.arch))


if __name__ == "__main__":
    sys.exit(main())
