"""Reproducible offline install of Detectron2 for the detection fine-tuning (optional extra).

Official Detectron2 is not on PyPI and GitHub is out of reach here. PyPI does hold
`sal-detectron2==0.7.2`: a wheel of upstream commit a59f0563 (2024-04) with all model-zoo configs,
but tagged cp310 (pip refuses it on 3.11), carrying a CUDA-12 `_C` extension built for another
torch, a stray top-level `tools` package, an over-strict `numpy<2` and no fvcore/iopath pins.

This module owns the fix-up as a *repack* (the wheel's Python sources are untouched):
fetch the wheel by name (sha256-pinned), drop `_C*.so` and `tools/`, rewrite the metadata
(pure-Python `py3-none-any` tag, local version `+sparkme.N`, the requirements that work here),
cache the result outside the repo and `pip install` it, so pip resolves and records everything.
Mask R-CNN R50-FPN does not need `_C` (ROIAlign/NMS come from torchvision; COCO evaluation falls
back to pycocotools).

Upstream route for users with internet (builds `_C`, ~5 min):
    pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git'

    python -m spark_me._build.detectron2 [--python .venv/bin/python] [--wheel-only]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import logging
import subprocess
import sys
import zipfile
from pathlib import Path

from spark_me._build.fetch import BuildError, cache_root, fetch_by_name, run_step

log = logging.getLogger("spark_me.build")

SOURCE_WHEEL = "sal_detectron2-0.7.2-cp310-none-any.whl"
SOURCE_SHA256 = "491af0c7f79bdb2d178e46f6cb16a97c4ac968d45c41ea3f6b6435d59bbee561"
REPACK = 1  # bump when the rules below change: it is part of the version and the cache key
VERSION = f"0.7.2+sparkme.{REPACK}"
DIST = "sal_detectron2"
# What Detectron2 imports, with the pins that work on this stack (numpy 2 works; black is only used
# by LazyConfig.save's pretty-printing, which falls back without it).
REQUIRES = [
    "Pillow>=7.1",
    "matplotlib",
    "pycocotools>=2.0.2",
    "termcolor>=1.1",
    "yacs>=0.1.8",
    "tabulate",
    "cloudpickle",
    "tqdm>4.29.0",
    "tensorboard",
    "omegaconf>=2.1,<2.4",
    "hydra-core>=1.1",
    "packaging",
    "fvcore>=0.1.5,<0.1.6",
    "iopath>=0.1.7,<0.1.10",
    "setuptools<81",  # detectron2.model_zoo imports pkg_resources, removed in setuptools 81
]


def _dropped(name: str) -> bool:
    top = name.split("/", 1)[0]
    return top == "tools" or top.endswith(".dist-info") or (top == "detectron2" and "/_C." in f"/{name}")


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _metadata(original: str) -> str:
    head = [
        line
        for line in original.split("\n\n", 1)[0].splitlines()
        if not line.startswith(("Requires-Dist:", "Version:", "Provides-Extra:"))
    ]
    head.insert(2, f"Version: {VERSION}")
    head += [f"Requires-Dist: {req}" for req in REQUIRES]
    note = (
        "Repacked by spark-me from sal-detectron2 0.7.2 (Detectron2 commit a59f0563): "
        "pure-Python, without the prebuilt _C extension and the top-level tools package.\n"
    )
    return "\n".join(head) + "\n\n" + note


def repack(source: Path, outdir: Path) -> Path:
    """Write the pure-Python wheel into `outdir` (deterministic: fixed timestamps, sorted entries)."""
    dist_info = f"{DIST}-{VERSION}.dist-info"
    target = outdir / f"{DIST}-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(source) as src:
        names = src.namelist()
        metadata = src.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        licence = src.read(next(n for n in names if n.endswith(".dist-info/LICENSE")))
        files = {n: src.read(n) for n in sorted(names) if not n.endswith("/") and not _dropped(n)}
    if not any(n.startswith("detectron2/model_zoo/configs/") for n in files):
        raise BuildError(f"{source.name} lacks Detectron2's model-zoo configs: not the expected wheel")
    files[f"{dist_info}/METADATA"] = _metadata(metadata).encode()
    files[f"{dist_info}/LICENSE"] = licence
    files[f"{dist_info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: spark-me repack\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    files[f"{dist_info}/top_level.txt"] = b"detectron2\n"
    record = [f"{n},{_record_hash(d)},{len(d)}" for n, d in files.items()] + [f"{dist_info}/RECORD,,"]
    files[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()
    tmp = target.with_suffix(".part")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as out:
        for name, data in files.items():
            out.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data, zipfile.ZIP_DEFLATED)
    tmp.replace(target)
    return target


def ensure_wheel() -> Path:
    """The cached repacked wheel, making it (download + repack, seconds) when absent."""
    outdir = cache_root() / "wheels" / f"detectron2-{SOURCE_SHA256[:12]}-repack{REPACK}"
    wheel = outdir / f"{DIST}-{VERSION}-py3-none-any.whl"
    if wheel.exists():
        return wheel
    source = fetch_by_name("sal-detectron2", SOURCE_WHEEL, SOURCE_SHA256, cache_root() / "src" / SOURCE_WHEEL)
    outdir.mkdir(parents=True, exist_ok=True)
    log.info("repacking %s as a pure-Python wheel", SOURCE_WHEEL)
    return repack(source, outdir)


def installed_version(python: str) -> str | None:
    code = "import importlib.metadata as m; print(m.version('sal-detectron2'))"
    out = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def ensure_detectron2(
    python: str, wheel: Path | None = None, pip_options: tuple[str, ...] = (), env: dict | None = None
) -> None:
    """Make `import detectron2` work in `python` (a pip install of the cached repacked wheel).

    `wheel`, `pip_options`, `env`: an offline bundle's copy of the wheel and the pip settings that
    keep pip on the bundle (no index)."""
    if installed_version(python) == VERSION:
        log.info("Detectron2 %s already installed", VERSION)
        return
    wheel = wheel or ensure_wheel()
    log.info("installing Detectron2 %s and its dependencies into %s", VERSION, python)
    cmd = [python, "-m", "pip", "install", "--quiet", *pip_options, str(wheel)]
    subprocess.run(cmd, check=True, env=env)
    check = subprocess.run(
        [python, "-c", "import detectron2.model_zoo, detectron2.modeling; print(detectron2.__file__)"],
        capture_output=True,
        text=True,
    )
    if check.returncode != 0:
        raise BuildError(f"Detectron2 was installed but does not import:\n{check.stderr[-3000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--python", default=sys.executable, help="interpreter to install Detectron2 into")
    parser.add_argument("--wheel-only", action="store_true", help="make the cached wheel, do not install")
    args = parser.parse_args(argv)
    if args.wheel_only:
        return run_step(lambda: print(ensure_wheel()))
    return run_step(lambda: ensure_detectron2(args.python))


if __name__ == "__main__":
    sys.exit(main())
