"""The project-owned ME build: patches, cache keys, and that the installed ME is the one built here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from spark_me._build import minkowski


def test_every_patch_says_why() -> None:
    patches = minkowski.patch_files()
    assert len(patches) >= 4
    for patch in patches:
        assert len(minkowski.patch_reason(patch)) > 20, patch.name


def test_patch_without_reason_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "0001-x.patch").write_text("--- a/x\n+++ b/x\n")
    monkeypatch.setattr(minkowski, "PATCH_DIR", tmp_path)
    with pytest.raises(minkowski.BuildError, match="Reason"):
        minkowski.patch_reason(minkowski.patch_files()[0])


def test_patch_hash_tracks_the_patch_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy = tmp_path / "patches"
    shutil.copytree(minkowski.PATCH_DIR, copy)
    monkeypatch.setattr(minkowski, "PATCH_DIR", copy)
    before = minkowski.patch_set_hash()
    assert minkowski.patch_set_hash() == before  # deterministic
    first = sorted(copy.glob("*.patch"))[0]
    first.write_text(first.read_text() + "\n")
    assert minkowski.patch_set_hash() != before


def test_cache_key_names_everything_the_wheel_is_tied_to() -> None:
    target = minkowski.Target(sys.executable, "cp311", "2.14.1+cu130", None, None)
    key = target.key
    assert "cp311" in key and "torch2.14.1+cu130" in key and "-cpu-" in key
    assert key.endswith(minkowski.patch_set_hash())
    cuda = minkowski.Target(sys.executable, "cp311", "2.14.1+cu130", "13.0", "8.0;9.0")
    assert "cu13.0" in cuda.key and ";" not in cuda.key and cuda.key != key


def test_cache_root_is_outside_the_repo(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SPARK_ME_CACHE", raising=False)
    repo = Path(__file__).resolve().parents[2]
    assert repo not in minkowski.cache_root().resolve().parents
    monkeypatch.setenv("SPARK_ME_CACHE", str(tmp_path))
    assert minkowski.cache_root() == tmp_path


def test_patches_apply_to_the_real_sdist(tmp_path: Path) -> None:
    """Fetch (or reuse the cached, hash-checked) sdist and apply every patch to it."""
    sdist = minkowski.fetch_sdist(minkowski.cache_root())
    src = minkowski.unpack_and_patch(sdist, tmp_path)
    setup_py = (src / "setup.py").read_text()
    assert 'run_command("rm"' not in setup_py and 'pip", "uninstall' not in setup_py
    assert "import numpy.distutils" not in setup_py
    assert "library_dirs=library_dirs" in setup_py
    for module in src.joinpath("MinkowskiEngine").rglob("*.py"):
        text = module.read_text()
        assert "from collections import Sequence" not in text, module
        assert "import torch._six" not in text and "from torch._six" not in text, module


def test_installed_me_is_this_patch_set() -> None:
    """The interpreter running the tests has the ME wheel built from the current patches."""
    target = minkowski.probe_target(sys.executable, cuda=False, arch_list=None)
    assert minkowski.installed_key(sys.executable) == target.key
    assert minkowski.check_import(sys.executable) == minkowski.ME_VERSION


# --- BLAS: the system OpenBLAS, else PyPI's scipy-openblas32 wheel ---------------------------------

CBLAS_PROBE = r"""
#include <cblas.h>
extern "C" void probe(float *s, double *d) {
  const float a[4] = {1, 2, 3, 4}, b[4] = {5, 6, 7, 8};  // row-major 2x2
  const double ad[4] = {1, 2, 3, 4}, bd[4] = {5, 6, 7, 8};
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, 2, 2, 2, 1.0f, a, 2, b, 2, 0.0f, s, 2);
  cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, 2, 2, 2, 1.0, ad, 2, bd, 2, 0.0, d, 2);
  cblas_saxpy(4, 2.0f, a, 1, s, 1);  // s += 2 a
  cblas_daxpy(4, -1.0, ad, 1, d, 1);  // d -= ad
}
"""

# Runs the patched setup.py with setuptools.setup replaced: what it would hand to the build.
SETUP_ARGS = r"""
import json, runpy, sys, setuptools
seen = {}
setuptools.setup = lambda **kw: seen.update(kw)
sys.argv = ["setup.py"]
runpy.run_path("setup.py", run_name="__main__")
(ext,) = seen["ext_modules"]
print(json.dumps({"include_dirs": seen["include_dirs"], "cxx": ext.extra_compile_args["cxx"],
                  "nvcc": ext.extra_compile_args["nvcc"], "libraries": ext.libraries,
                  "library_dirs": ext.library_dirs, "link": ext.extra_link_args}))
"""


@pytest.mark.parametrize(
    ("setting", "system_found", "expected"),
    [
        (None, True, minkowski.SYSTEM_BLAS),
        (None, False, minkowski.WHEEL_BLAS),
        ("wheel", True, minkowski.WHEEL_BLAS),
        ("system", False, minkowski.SYSTEM_BLAS),
    ],
)
def test_the_wheel_blas_is_chosen_when_the_system_has_no_openblas(
    monkeypatch: pytest.MonkeyPatch, setting: str | None, system_found: bool, expected: str
) -> None:
    monkeypatch.setattr(minkowski, "_has_openblas", lambda: system_found)
    monkeypatch.setattr(minkowski.sys, "platform", "linux")
    if setting is None:
        monkeypatch.delenv("SPARK_ME_BLAS", raising=False)
    else:
        monkeypatch.setenv("SPARK_ME_BLAS", setting)
    assert minkowski.choose_blas() == expected


def test_forced_system_blas_that_is_missing_and_a_bad_setting_are_one_line_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(minkowski, "_has_openblas", lambda: False)
    target = minkowski.Target(sys.executable, "cp311", "2.14.1+cu130", None, None, minkowski.SYSTEM_BLAS)
    with pytest.raises(minkowski.BuildError, match="apt-get install -y libopenblas-dev") as err:
        minkowski.ensure_blas(target)
    assert "\n" not in str(err.value)
    monkeypatch.setenv("SPARK_ME_BLAS", "mkl")
    with pytest.raises(minkowski.BuildError, match="auto, system or wheel"):
        minkowski.choose_blas()


def test_wheel_blas_has_its_own_key_and_leaves_system_keys_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    system = minkowski.Target(sys.executable, "cp311", "2.14.1+cu130", None, None)
    wheel = minkowski.Target(sys.executable, "cp311", "2.14.1+cu130", None, None, minkowski.WHEEL_BLAS)
    assert system.key.endswith(f"-cpu-patches{minkowski.patch_set_hash()}")  # as before the fallback
    assert "-cpu-scipy-openblas-patches" in wheel.key and wheel.key != system.key
    names = [p.name for p in minkowski.patch_files(blas=minkowski.WHEEL_BLAS)]
    assert names[-1].endswith("blas-from-scipy-openblas-wheel.patch")
    assert names[-1] not in [p.name for p in minkowski.patch_files(cuda=True)]
    copy = tmp_path / "blas-patches"
    shutil.copytree(minkowski.BLAS_WHEEL_PATCH_DIR, copy)
    monkeypatch.setattr(minkowski, "BLAS_WHEEL_PATCH_DIR", copy)
    before_system, before_wheel = system.key, wheel.key
    patch = sorted(copy.glob("*.patch"))[0]
    patch.write_text(patch.read_text() + "\n")
    assert system.key == before_system and wheel.key != before_wheel


def _fake_pip_wheel(calls: list[dict]):
    """Stands in for `pip wheel` (other commands run): records the environment and the setup.py
    pip would build, and leaves a wheel where pip would."""
    real_run = subprocess.run

    def run(cmd, stdout=None, stderr=None, env=None, **kw):
        if cmd[1:4] != ["-m", "pip", "wheel"]:
            return real_run(cmd, stdout=stdout, stderr=stderr, env=env, **kw)
        setup_py = Path(cmd[-1], "setup.py")
        calls.append(dict(env, setup_py=setup_py.read_text() if setup_py.exists() else ""))
        outdir = Path(cmd[cmd.index("-w") + 1])
        (outdir / "MinkowskiEngine-0.5.4-cp311-cp311-linux_x86_64.whl").write_bytes(b"")
        return subprocess.CompletedProcess(cmd, 0)

    return run


def test_the_build_is_told_which_blas(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conda = tmp_path / "conda"
    (conda / "include").mkdir(parents=True)
    (conda / "include" / "cblas.h").write_text("")
    monkeypatch.setenv("CONDA_PREFIX", str(conda))
    monkeypatch.delenv("ME_BLAS", raising=False)
    for name in ("ME_BLAS_INCLUDE_DIRS", "ME_BLAS_LIBRARY_DIRS"):
        monkeypatch.delenv(name, raising=False)
    calls: list[dict] = []
    monkeypatch.setattr(minkowski.subprocess, "run", _fake_pip_wheel(calls))
    for blas in (minkowski.WHEEL_BLAS, minkowski.SYSTEM_BLAS):
        target = minkowski.Target(sys.executable, "cp311", "2.14.1+cu130", None, None, blas)
        outdir = tmp_path / blas
        outdir.mkdir()
        minkowski.build_wheel(target, tmp_path, outdir, tmp_path / f"{blas}.log")
    wheel_env, system_env = calls
    assert wheel_env["ME_BLAS"] == "scipy-openblas" and "ME_BLAS_INCLUDE_DIRS" not in wheel_env
    assert system_env["ME_BLAS"] == "openblas" and system_env["ME_BLAS_INCLUDE_DIRS"] == f"{conda}/include"


def test_without_system_openblas_the_wheel_is_built_against_the_blas_wheel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ensure_wheel end to end but for the compiler: the probe finds no system OpenBLAS, so the BLAS
    wheel is made available in the target, the extra patch is applied, and the cache key says so."""
    sdist = minkowski.fetch_sdist(minkowski.cache_root())
    (tmp_path / "cache" / "sdist").mkdir(parents=True)
    shutil.copy2(sdist, tmp_path / "cache" / "sdist" / sdist.name)  # a scratch cache: nothing downloads
    monkeypatch.setenv("SPARK_ME_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SPARK_ME_BLAS", raising=False)
    monkeypatch.setattr(minkowski, "_has_openblas", lambda: False)
    monkeypatch.setattr(minkowski.sys, "platform", "linux")
    target = minkowski.probe_target(sys.executable, cuda=False, arch_list=None)
    made_available: list[str] = []
    monkeypatch.setattr(minkowski, "ensure_blas_wheel", made_available.append)
    calls: list[dict] = []
    monkeypatch.setattr(minkowski.subprocess, "run", _fake_pip_wheel(calls))
    wheel = minkowski.ensure_wheel(target)
    assert made_available == [sys.executable]
    (env,) = calls
    assert env["ME_BLAS"] == "scipy-openblas" and "scipy_openblas32.get_lib_dir()" in env["setup_py"]
    assert wheel.parent.name == target.key and "-cpu-scipy-openblas-" in target.key
    info = json.loads((wheel.parent / "build-info.json").read_text())
    assert info["blas"] == "scipy-openblas" and info["key"] == target.key


def test_wheel_blas_missing_offline_is_a_one_line_error(tmp_path: Path) -> None:
    """A target without scipy-openblas32 whose pip cannot install it (here: it has no pip)."""
    venv = tmp_path / "venv"
    base_python = Path(sys.base_prefix) / "bin" / "python3"
    subprocess.run([str(base_python), "-m", "venv", "--without-pip", str(venv)], check=True)
    with pytest.raises(minkowski.BuildError, match="scipy-openblas32 is not in") as err:
        minkowski.ensure_blas_wheel(str(venv / "bin" / "python"))
    assert "\n" not in str(err.value) and "spark-me[build]" in str(err.value)


def test_patched_setup_links_the_wheel_blas_and_its_cblas_computes(tmp_path: Path) -> None:
    """The patched setup.py under ME_BLAS=scipy-openblas, against the real scipy-openblas32 wheel
    (the `build` extra installs it): a C++ file calling ME's four cblas functions, compiled and
    linked with exactly the flags setup.py gives the extension, placed where ME's extension lives
    in site-packages, loads the wheel's library found by the $ORIGIN rpath and computes right."""
    sdist = minkowski.fetch_sdist(minkowski.cache_root())
    src = minkowski.unpack_and_patch(sdist, tmp_path / "src", blas=minkowski.WHEEL_BLAS)
    env = dict(os.environ, ME_BLAS="scipy-openblas", ME_CPU_ONLY="1")
    out = subprocess.run([sys.executable, "-c", SETUP_ARGS], cwd=src, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    args = json.loads(out.stdout.strip().splitlines()[-1])
    (blas_lib,) = [d for d in args["library_dirs"] if "scipy_openblas32" in d]  # torch adds its own
    (blas,) = [lib for lib in args["libraries"] if "blas" in lib]
    assert blas == ":libscipy_openblas.so" and Path(blas_lib, blas[1:]).is_file()
    assert args["link"] == ["-Wl,-rpath,$ORIGIN/../scipy_openblas32/lib", f"-Wl,-rpath,{blas_lib}"]
    for name in ("cblas_sgemm", "cblas_dgemm", "cblas_saxpy", "cblas_daxpy"):
        assert f"-D{name}=scipy_{name}" in args["cxx"] and f"-D{name}=scipy_{name}" in args["nvcc"]

    site = tmp_path / "site-packages"  # ME's _C lives in site-packages/MinkowskiEngineBackend/
    shutil.copytree(blas_lib, site / "scipy_openblas32" / "lib")
    (site / "MinkowskiEngineBackend").mkdir()
    ext = site / "MinkowskiEngineBackend" / "_C.so"
    (tmp_path / "probe.cpp").write_text(CBLAS_PROBE)
    defines = [flag for flag in args["cxx"] if flag.startswith("-D")]
    compile_cmd = ["g++", "-shared", "-fPIC", "-o", str(ext), str(tmp_path / "probe.cpp"), *defines]
    compile_cmd += [f"-I{d}" for d in args["include_dirs"]] + [f"-L{blas_lib}"]
    compile_cmd += [f"-l{blas}", *args["link"]]
    built = subprocess.run(compile_cmd, capture_output=True, text=True)  # no shell, like setuptools
    assert built.returncode == 0, built.stderr[-2000:]
    dynamic = subprocess.run(["readelf", "-d", str(ext)], capture_output=True, text=True, check=True).stdout
    needed = [line.split("[")[-1].rstrip("]") for line in dynamic.splitlines() if "(NEEDED)" in line]
    assert "libscipy_openblas.so" in needed and not [n for n in needed if n.startswith("libopenblas")]
    assert f"$ORIGIN/../scipy_openblas32/lib:{blas_lib}" in dynamic

    load = (
        "import ctypes, json, sys; lib = ctypes.CDLL(sys.argv[1]);"
        "s = (ctypes.c_float * 4)(); d = (ctypes.c_double * 4)(); lib.probe(s, d);"
        "maps = [l.split()[-1] for l in open('/proc/self/maps') if 'libscipy_openblas' in l];"
        "print(json.dumps([list(s), list(d), sorted(set(maps))]))"
    )
    ran = subprocess.run([sys.executable, "-c", load, str(ext)], capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr[-2000:]
    sgemm_saxpy, dgemm_daxpy, loaded = json.loads(ran.stdout)
    assert sgemm_saxpy == [21.0, 26.0, 49.0, 58.0]  # [[19, 22], [43, 50]] + 2 * [[1, 2], [3, 4]]
    assert dgemm_daxpy == [18.0, 20.0, 40.0, 46.0]  # [[19, 22], [43, 50]] - [[1, 2], [3, 4]]
    assert loaded == [str((site / "scipy_openblas32" / "lib" / "libscipy_openblas.so").resolve())]
