"""An offline bundle: every file an install without internet needs, for a given target interpreter.

GPU clusters' compute nodes often have no internet and bring their own torch. This module, run on a
machine *with* internet, writes into one folder

    wheels/      every dependency of spark-me[extras] resolved for the target Python and platform
                 (pure-Python projects published only as sdists are built into wheels here),
                 plus the repacked Detectron2 wheel when asked for
    sdist/       the MinkowskiEngine sdist (hash-checked against the pin in minkowski.py)
    manifest.json  what the bundle was made for, each file's sha256 and size, the total size

and `python3 -m spark_me.bootstrap setup --offline DIR` installs from it alone (no index).

Resolution is pip's own (`pip install --dry-run --report`, with `--python-version/--platform` for a
foreign target), so the bundle holds exactly what pip would install there. Two tricks keep it small:
- `--torch system`: torch and torchvision resolve to empty stand-in wheels made here, so neither
  they nor their dependencies (CUDA libraries, triton, sympy, ...) are downloaded.
- `--have FILE` / `--profile NAME`: projects the target already has (a `pip freeze` of it, or a
  named list such as the GPU image's) are left out, with what only they need; setup then relies
  on the target's copies (pip checks their versions when it installs).

Standard library only (it shells out to pip), like the rest of the set-up code.

    python3 -m spark_me.bootstrap bundle DIR [--python-version 3.12] [--platform TAG ...]
        [--torch system|pinned] [--extras build,dev] [--detectron2] [--have FILE | --profile NAME]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

from spark_me._build import detectron2, minkowski
from spark_me._build.fetch import BuildError, cache_root, sha256

log = logging.getLogger("spark_me.build")

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = "manifest.json"
FORMAT = 1
DEFAULT_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux2014_x86_64")
TORCH_PROJECTS = ("torch", "torchvision")
# Stand-ins for resolution only (the target's own torch is used); any version in the supported range.
STUB_VERSIONS = {"torch": "2.14.1", "torchvision": "0.29.1"}
STUB_LABEL = "sparkmestub"
# What the GPU nodes' image (Python 3.12, torch 2.11+cu130) already has; timm is not listed because
# its version there is unknown and spark-me pins timm>=1.0,<1.1. setuptools is never left out: the
# offline editable install builds spark-me in an isolated environment that needs setuptools>=77.
PROFILES = {
    "gpu-node": (
        "numpy pillow pyyaml tqdm tensorboard scikit-image scipy matplotlib pytest ninja cmake "
        "pybind11 wheel"
    ).split(),
}
NEVER_LEFT_OUT = {"setuptools"}


def normalize(name: str) -> str:
    """PEP 503 project name: what pip compares."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(extras: list[str], with_detectron2: bool, torch: str) -> list[str]:
    """spark-me's own requirements (pyproject), its build backend, and the extras asked for."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    reqs = list(project["project"]["dependencies"]) + list(project["build-system"]["requires"])
    optional = project["project"]["optional-dependencies"]
    for extra in extras + (["pinned"] if torch == "pinned" else []):
        if extra not in optional:
            raise BuildError(f"unknown extra {extra!r}; pyproject.toml has {', '.join(sorted(optional))}")
        reqs += optional[extra]
    if with_detectron2:
        reqs += detectron2.REQUIRES
    return reqs


def stub_wheel(outdir: Path, name: str, version: str) -> Path:
    """An empty wheel that only satisfies the resolver (it is never put into a bundle)."""
    dist_info = f"{name}-{version}.dist-info"
    files = {
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: spark-me\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [
        f"{n},sha256={base64.urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b'=').decode()},{len(d)}"
        for n, d in files.items()
    ]
    files[f"{dist_info}/RECORD"] = ("\n".join([*record, f"{dist_info}/RECORD,,"]) + "\n").encode()
    path = outdir / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for entry, data in files.items():
            zf.writestr(zipfile.ZipInfo(entry, date_time=(1980, 1, 1, 0, 0, 0)), data)
    return path


def resolve(
    reqs: list[str], report: Path, find_links: list[Path], constraints: Path | None, target: dict | None
) -> list[dict]:
    """pip's resolution, without installing: the report's `install` items (name, version, URL, hash).

    `target`: {"python_version": "3.12", "platforms": [...]} for a foreign interpreter (wheels only,
    pip's rule); None resolves for this interpreter (sdists allowed, used to find sdist-only projects).
    """
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet"]
    cmd += ["--report", str(report)]
    if target:
        cmd += ["--target", str(report.parent / "never-written"), "--only-binary=:all:", "--implementation", "cp"]
        cmd += ["--python-version", target["python_version"]]
        for platform in target["platforms"]:
            cmd += ["--platform", platform]
    for links in find_links:
        cmd += ["--find-links", str(links)]
    if constraints:
        cmd += ["-c", str(constraints)]
    result = subprocess.run([*cmd, *reqs], capture_output=True, text=True)
    if result.returncode != 0:
        errors = [line for line in result.stderr.splitlines() if "ERROR" in line] or result.stderr.splitlines()
        raise BuildError(f"pip could not resolve the bundle's requirements: {' | '.join(errors[-3:])}")
    return json.loads(report.read_text())["install"]


def is_wheel(item: dict) -> bool:
    return item["download_info"]["url"].split("#")[0].endswith(".whl")


def build_pure_wheels(items: list[dict], outdir: Path) -> list[Path]:
    """Projects this interpreter would install from an sdist: build each into a wheel once.

    Only platform-independent results (`-none-any`) are kept; they serve any target. Others are
    dropped here, and the target resolution then says which project has no usable wheel.
    """
    built = []
    for item in items:
        if is_wheel(item):
            continue
        name, version = item["metadata"]["name"], item["metadata"]["version"]
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", tmp, f"{name}=={version}"]
            subprocess.run(cmd, check=True, capture_output=True)
            for wheel in Path(tmp).glob("*.whl"):
                if wheel.name.endswith("-none-any.whl"):
                    built.append(Path(shutil.copy2(wheel, outdir)))
                    log.info("built pure-Python wheel %s (no wheel on the index)", wheel.name)
                else:
                    log.warning("%s %s builds a platform-specific wheel here: not usable for a bundle", name, version)
    return built


def dependents_closure(items: list[dict], leave_out: set[str]) -> set[str]:
    """Names still needed when `leave_out` projects are provided by the target: everything reachable
    from the requested projects without passing through a left-out one. Markers are not evaluated,
    so this errs on the side of keeping a file."""
    by_name = {normalize(i["metadata"]["name"]): i for i in items}
    needed: set[str] = set()
    todo = [n for n, i in by_name.items() if i.get("requested") and n not in leave_out]
    while todo:
        name = todo.pop()
        if name in needed:
            continue
        needed.add(name)
        for req in by_name[name]["metadata"].get("requires_dist", []):
            dep = normalize(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req).group(1))
            if dep in by_name and dep not in leave_out:
                todo.append(dep)
    return needed


def download(url: str, expected: str | None, dest: Path) -> str:
    """Copy `url` (http(s) or file) to `dest` through a cache keyed by sha256; returns the sha256."""
    cached = cache_root() / "downloads" / (expected or "unhashed") / dest.name
    if expected and cached.exists() and sha256(cached) == expected:
        shutil.copy2(cached, dest)
        return expected
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        shutil.copy2(urllib.request.url2pathname(parsed.path), dest)
    else:
        tmp = dest.with_suffix(dest.suffix + ".part")
        with urllib.request.urlopen(url, timeout=300) as resp, open(tmp, "wb") as fh:
            shutil.copyfileobj(resp, fh)
        tmp.replace(dest)
    digest = sha256(dest)
    if expected and digest != expected:
        dest.unlink()
        raise BuildError(f"sha256 of {dest.name} from {url} does not match the index's {expected}")
    if expected:
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(dest, cached)
    return digest


def read_have(path: Path | None, profile: str | None) -> list[str]:
    """Project names the target already has: a `pip freeze`/`pip list --format=freeze` file or a profile."""
    names: list[str] = []
    if profile:
        if profile not in PROFILES:
            raise BuildError(f"unknown profile {profile!r}; known: {', '.join(sorted(PROFILES))}")
        names += PROFILES[profile]
    if path:
        if not path.is_file():
            raise BuildError(f"--have {path}: no such file")
        for line in path.read_text().splitlines():
            match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line)
            if match and not line.lstrip().startswith(("#", "-")):
                names.append(match.group(1))
    return sorted({normalize(n) for n in names} - NEVER_LEFT_OUT)


def make_bundle(
    dest: Path,
    python_version: str,
    platforms: list[str],
    torch: str = "system",
    extras: list[str] | None = None,
    with_detectron2: bool = False,
    have: list[str] | None = None,
) -> dict:
    """Write the bundle into `dest` (emptied first if it is a bundle) and return its manifest."""
    started = time.monotonic()
    extras = list(extras if extras is not None else ["build", "dev"])
    have = list(have or [])
    if torch not in ("system", "pinned"):
        raise BuildError(f"--torch must be 'system' or 'pinned', not {torch!r}")
    if not re.fullmatch(r"3\.\d+", python_version):
        raise BuildError(f"--python-version must look like 3.12, not {python_version!r}")
    if dest.exists() and not dest.is_dir():
        raise BuildError(f"{dest} is a file, not a folder for a bundle")
    if dest.exists() and any(dest.iterdir()) and not (dest / MANIFEST).exists():
        raise BuildError(f"{dest} exists, is not empty and is not a bundle: choose another folder")
    reqs = requirements(extras, with_detectron2, torch)  # before anything is removed
    shutil.rmtree(dest, ignore_errors=True)
    wheels = dest / "wheels"
    wheels.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="spark-me-bundle-") as tmp:
        work = Path(tmp)
        links = work / "links"
        links.mkdir()
        constraints = None
        if torch == "system":
            constraints = work / "constraints.txt"
            pins = []
            for name, version in STUB_VERSIONS.items():
                stub_wheel(links, name, f"{version}+{STUB_LABEL}")
                pins.append(f"{name}=={version}+{STUB_LABEL}")
            constraints.write_text("\n".join(pins) + "\n")
        log.info("resolving for this interpreter (to find projects published only as sdists)")
        local = resolve(reqs, work / "local.json", [links], constraints, None)
        build_pure_wheels(local, links)
        target = {"python_version": python_version, "platforms": platforms}
        log.info("resolving for Python %s on %s", python_version, ", ".join(platforms))
        items = resolve(reqs, work / "target.json", [links], constraints, target)
        needed = dependents_closure(items, set(have) | (set(TORCH_PROJECTS) if torch == "system" else set()))
        files = []
        for item in sorted(items, key=lambda i: normalize(i["metadata"]["name"])):
            name = normalize(item["metadata"]["name"])
            if name not in needed:
                continue
            url = item["download_info"]["url"]
            filename = urllib.parse.unquote(Path(urllib.parse.urlparse(url).path).name)
            hashes = item["download_info"].get("archive_info", {}).get("hashes", {})
            digest = download(url, hashes.get("sha256"), wheels / filename)
            files.append(
                {
                    "name": name,
                    "version": item["metadata"]["version"],
                    "path": f"wheels/{filename}",
                    "sha256": digest,
                    "size": (wheels / filename).stat().st_size,
                }
            )
    sdist = minkowski.fetch_sdist(cache_root())
    (dest / "sdist").mkdir()
    shutil.copy2(sdist, dest / "sdist" / sdist.name)
    files.append(_entry(dest, f"sdist/{sdist.name}", "minkowskiengine", minkowski.ME_VERSION))
    if with_detectron2:
        wheel = detectron2.ensure_wheel()
        shutil.copy2(wheel, wheels / wheel.name)
        files.append(_entry(dest, f"wheels/{wheel.name}", "sal-detectron2", detectron2.VERSION))
    total = sum(f["size"] for f in files)
    manifest = {
        "format": FORMAT,
        "python_version": python_version,
        "platforms": platforms,
        "torch": torch,
        "extras": extras,
        "detectron2": with_detectron2,
        "left_out": sorted(set(have) | (set(TORCH_PROJECTS) if torch == "system" else set())),
        "files": files,
        "total_bytes": total,
        "total_mib": round(total / 2**20, 1),
    }
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    log.info(
        "bundle %s: %d files, %.1f MiB, for Python %s (torch: %s) in %.0f s",
        dest, len(files), total / 2**20, python_version, torch, time.monotonic() - started,
    )  # fmt: skip
    return manifest


def _entry(dest: Path, rel: str, name: str, version: str) -> dict:
    path = dest / rel
    return {"name": name, "version": version, "path": rel, "sha256": sha256(path), "size": path.stat().st_size}


def load(dest: Path) -> dict:
    """The bundle's manifest after checking every file against it (size, then sha256)."""
    manifest_path = dest / MANIFEST
    if not manifest_path.is_file():
        raise BuildError(f"{dest} is not a spark-me bundle (no {MANIFEST}); make one with `bootstrap bundle`")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT:
        raise BuildError(f"{manifest_path} has format {manifest.get('format')}, this spark-me reads {FORMAT}")
    for entry in manifest["files"]:
        path = dest / entry["path"]
        if not path.is_file() or path.stat().st_size != entry["size"] or sha256(path) != entry["sha256"]:
            raise BuildError(f"bundle file {entry['path']} is missing or does not match {manifest_path}")
    return manifest


def seed_cache(dest: Path, manifest: dict) -> None:
    """Put the bundle's (checked) ME sdist where the ME build looks for it, so it never downloads."""
    (entry,) = [f for f in manifest["files"] if f["name"] == "minkowskiengine"]
    cached = cache_root() / "sdist" / Path(entry["path"]).name
    if not (cached.exists() and sha256(cached) == entry["sha256"]):
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(dest / entry["path"], cached)


def detectron2_wheel(dest: Path, manifest: dict) -> Path | None:
    entries = [f for f in manifest["files"] if f["name"] == "sal-detectron2"]
    return dest / entries[0]["path"] if entries else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m spark_me.bootstrap bundle",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dest", type=Path, help="folder to write (replaced if it already is a bundle)")
    here = "{}.{}".format(*sys.version_info[:2])
    parser.add_argument("--python-version", default=here, help=f"target interpreter (default {here})")
    parser.add_argument(
        "--platform",
        action="append",
        dest="platforms",
        help=f"wheel platform tag, repeatable (default: {' '.join(DEFAULT_PLATFORMS)})",
    )
    parser.add_argument(
        "--torch",
        choices=["system", "pinned"],
        default="system",
        help="system: leave torch/torchvision out (the target's own); pinned: bundle the pinned pair",
    )
    parser.add_argument("--extras", default="build,dev", help="spark-me extras to include (default build,dev)")
    parser.add_argument("--detectron2", action="store_true", help="include the repacked Detectron2 and its deps")
    parser.add_argument("--have", type=Path, help="`pip freeze` of the target: leave those projects out")
    parser.add_argument("--profile", choices=sorted(PROFILES), help="a named list of what the target has")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[spark-me] %(message)s")
    try:
        make_bundle(
            args.dest,
            args.python_version,
            args.platforms or list(DEFAULT_PLATFORMS),
            torch=args.torch,
            extras=[e for e in args.extras.split(",") if e],
            with_detectron2=args.detectron2,
            have=read_have(args.have, args.profile),
        )
    except BuildError as err:
        log.error("error: %s", err)
        return 1
    except subprocess.CalledProcessError as err:
        log.error("error: %s failed (exit %d)", " ".join(map(str, err.cmd[:6])), err.returncode)
        return 1
    except OSError as err:  # e.g. no space left, a download cut off
        log.error("error: %s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
