"""The project-owned ME build: patches, cache keys, and that the installed ME is the one built here."""

from __future__ import annotations

import shutil
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
