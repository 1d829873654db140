"""Offline bundles: what goes in, what stays out, and an install from one with no index reachable.

The bundles are real (pip resolves, files are downloaded once into ~/.cache/spark-me/downloads and
hash-checked); each is made once per test session (module-scoped fixtures).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from spark_me import bootstrap
from spark_me._build import bundle, minkowski
from spark_me._build.fetch import BuildError, sha256

ROOT = bootstrap.ROOT
UNROUTABLE = "http://10.255.255.1/simple"  # no route: any index access would hang or fail
TORCH_STACK = ("torch", "torch-", "nvidia", "triton", "sympy", "mpmath")


@pytest.fixture(scope="module")
def bundle311(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This interpreter's bundle, system torch, the `build` extra: what the offline test installs."""
    dest = tmp_path_factory.mktemp("bundle") / "cp311"
    here = "{}.{}".format(*sys.version_info[:2])
    bundle.make_bundle(dest, here, list(bundle.DEFAULT_PLATFORMS), torch="system", extras=["build"])
    return dest


def test_bundle_holds_every_dependency_but_torch_and_its_manifest_checks_out(bundle311: Path) -> None:
    manifest = bundle.load(bundle311)
    names = {f["name"] for f in manifest["files"]}
    assert {"numpy", "timm", "scikit-image", "tensorboard", "ninja", "setuptools", "minkowskiengine"} <= names
    assert not [n for n in names if n.startswith(TORCH_STACK)], names  # torch and its CUDA stack left out
    assert manifest["left_out"] == ["torch", "torchvision"] and manifest["torch"] == "system"
    assert manifest["total_bytes"] == sum(f["size"] for f in manifest["files"])
    sdist = bundle311 / "sdist" / minkowski.SDIST_NAME
    assert sha256(sdist) == minkowski.SDIST_SHA256
    on_disk = {p.relative_to(bundle311).as_posix() for p in bundle311.rglob("*") if p.is_file()}
    assert on_disk == {f["path"] for f in manifest["files"]} | {bundle.MANIFEST}
    tag = "cp{}{}".format(*sys.version_info[:2])
    for wheel in (bundle311 / "wheels").iterdir():
        assert wheel.name.endswith(".whl") and any(t in wheel.name for t in (tag, "-abi3-", "-none-")), wheel


def test_a_changed_file_makes_the_bundle_refused(bundle311: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(bundle311, copy)
    victim = next((copy / "wheels").glob("tqdm-*.whl"))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other content
    victim.write_bytes(bytes(data))
    with pytest.raises(BuildError, match=victim.name):
        bundle.load(copy)
    with pytest.raises(BuildError, match="not a spark-me bundle"):
        bundle.load(tmp_path)


def test_gpu_node_bundle_for_python_312_fits_with_the_repository(tmp_path: Path) -> None:
    """The bundle the GPU nodes get (Python 3.12, their torch, their preinstalled stack)."""
    dest = tmp_path / "gpu"
    have = bundle.read_have(None, "gpu-node")
    manifest = bundle.make_bundle(
        dest, "3.12", list(bundle.DEFAULT_PLATFORMS), torch="system", extras=["build"], have=have
    )
    names = {f["name"] for f in manifest["files"]}
    assert "timm" in names and "setuptools" in names and "minkowskiengine" in names
    assert "scipy-openblas32" in names  # the BLAS ME links on nodes without a system OpenBLAS
    assert not names & {"numpy", "scipy", "scikit-image", "tensorboard", "grpcio", "pillow", "torch"}
    for entry in manifest["files"]:
        if entry["path"].endswith(".whl") and "-cp" in entry["path"]:
            assert "cp312" in entry["path"] or "abi3" in entry["path"], entry["path"]
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    repo_bytes = sum((ROOT / p).stat().st_size for p in tracked.decode().split("\0") if (ROOT / p).is_file())
    assert manifest["total_bytes"] < 20 * 2**20
    assert manifest["total_bytes"] + repo_bytes < 64 * 2**20


def test_have_file_leaves_out_what_only_those_projects_need(tmp_path: Path) -> None:
    freeze = tmp_path / "freeze.txt"
    freeze.write_text(
        "# pip freeze\nNumPy==2.5.0\nscikit_image==0.25.2\n-e git+https://x#egg=y\nsetuptools==60\n"
    )
    assert bundle.read_have(freeze, None) == ["numpy", "scikit-image"]  # setuptools never left out
    items = [
        {
            "metadata": {"name": "spark-dep", "requires_dist": ["scikit-image>=0.2", "packaging"]},
            "requested": True,
        },
        {"metadata": {"name": "scikit-image", "requires_dist": ["scipy", "packaging; extra == 'x'"]}},
        {"metadata": {"name": "scipy", "requires_dist": ["numpy<3"]}},
        {"metadata": {"name": "numpy", "requires_dist": []}, "requested": True},
        {"metadata": {"name": "packaging"}},
    ]
    assert bundle.dependents_closure(items, {"scikit-image", "numpy"}) == {"spark-dep", "packaging"}
    with pytest.raises(BuildError, match="unknown profile"):
        bundle.read_have(None, "laptop")


def _link_torch_stack(dest: Path) -> list[str]:
    """Symlinks to this interpreter's torch, torchvision and what torch needs (recursively, extras
    included): a 'system' torch for a scratch interpreter without copying gigabytes."""
    seen: set[tuple[str, str]] = set()
    todo = [("torch", ""), ("torchvision", "")]
    while todo:
        name, extra = todo.pop()
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        key = dist.metadata["Name"].lower()
        if (key, extra) in seen:
            continue
        seen.add((key, extra))
        for req in map(Requirement, dist.requires or []):
            wanted = req.marker is None or req.marker.evaluate({"extra": extra})
            if wanted and key != "torchvision":  # its numpy and pillow must come from the bundle
                todo += [(req.name, e) for e in ["", *req.extras]]
        for top in {Path(str(f)).parts[0] for f in dist.files or []} - {"..", "__pycache__"}:
            source = Path(str(dist.locate_file(top)))
            if source.exists() and not (dest / top).exists():
                (dest / top).symlink_to(source)
    return sorted({key for key, _ in seen})


@pytest.fixture(scope="module")
def torch_interpreter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scratch venv whose only packages are torch, torchvision and torch's own requirements."""
    base = tmp_path_factory.mktemp("torch-interpreter")
    linked = base / "linked"
    linked.mkdir()
    assert "torch" in _link_torch_stack(linked)
    venv = base / "venv"
    base_python = Path(sys.base_prefix) / "bin" / "python3"
    subprocess.run([str(base_python), "-m", "venv", "--without-pip", str(venv)], check=True)
    (site,) = (venv / "lib").glob("python3.*/site-packages")
    (site / "system_torch.pth").write_text(f"{linked}\n")
    return venv / "bin" / "python"


def offline_env(venv: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    env.update(SPARK_ME_VENV=str(venv), PIP_NO_INDEX="1", PIP_INDEX_URL=UNROUTABLE, PIP_FIND_LINKS="")
    env.update(PIP_EXTRA_INDEX_URL="", SPARK_ME_CUDA="0")
    return env


def run_bootstrap(python: Path, args: list[str], env: dict) -> subprocess.CompletedProcess:
    cmd = [str(python), "-m", "spark_me.bootstrap", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.heavy
def test_offline_install_with_the_system_torch_then_smoke(
    bundle311: Path, torch_interpreter: Path, tmp_path: Path
) -> None:
    """No index reachable: setup takes everything but torch from the bundle, leaves the
    interpreter's torch alone, installs ME from its cache key, and the smoke check passes."""
    venv = tmp_path / "venv"
    env = offline_env(venv)
    flags = ["--offline", str(bundle311), "--system-torch"]
    setup = run_bootstrap(torch_interpreter, ["setup", "--no-detectron2", *flags], env)
    assert setup.returncode == 0, setup.stderr[-3000:]
    assert f"from bundle {bundle311}" in setup.stderr
    probe = (
        "import json, numpy, timm, torch, MinkowskiEngine as ME; "
        "print(json.dumps([numpy.__file__, timm.__file__, torch.__file__, ME.__version__]))"
    )
    out = subprocess.run([str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True, env=env)
    numpy_file, timm_file, torch_file, me_version = json.loads(out.stdout)
    assert numpy_file.startswith(str(venv)) and timm_file.startswith(str(venv))  # from the bundle
    assert not torch_file.startswith(str(venv)) and me_version == minkowski.ME_VERSION  # torch untouched
    assert not list(venv.glob("lib/python3.*/site-packages/torch*"))
    smoke = run_bootstrap(torch_interpreter, ["smoke", *flags], env)
    assert smoke.returncode == 0, smoke.stderr[-3000:]
    assert "dependencies up to date" in smoke.stderr and "smoke check passed" in smoke.stderr


def test_a_bundle_for_another_python_or_without_torch_is_refused(
    bundle311: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = json.loads((bundle311 / bundle.MANIFEST).read_text())
    with pytest.raises(BuildError, match="--system-torch"):
        bootstrap.open_bundle(bootstrap.Install(offline=bundle311))
    other = tmp_path / "other"
    other.mkdir()
    (other / bundle.MANIFEST).write_text(json.dumps({**manifest, "files": [], "python_version": "3.99"}))
    with pytest.raises(BuildError, match="is for Python 3.99"):
        bootstrap.open_bundle(bootstrap.Install(offline=other, system_torch=True))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{file}"], "is a file, not a folder"),
        (["{full}"], "is not empty and is not a bundle"),
        (["{new}", "--python-version", "3"], "must look like 3.12"),
        (["{new}", "--extras", "gpu"], "unknown extra 'gpu'"),
    ],
)
def test_bad_bundle_arguments_are_one_line_errors(tmp_path: Path, caplog, args, message) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    paths = {k: str(tmp_path / k) for k in ("file", "full", "new")}
    assert bundle.main([a.format(**paths) for a in args]) == 1
    (record,) = [r for r in caplog.records if r.levelname == "ERROR"]
    assert message in record.getMessage() and "\n" not in record.getMessage()
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine"  # never emptied
