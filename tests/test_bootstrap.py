"""The set-up entry point: its commands and its dependency stamp."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from spark_me import bootstrap
from spark_me._build.fetch import BuildError


def test_help_lists_the_two_readme_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert bootstrap.main(["help"]) == 0
    out = capsys.readouterr().out
    assert "bootstrap pretrain" in out and "bootstrap test" in out


def test_unknown_command_does_no_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bootstrap, "setup", lambda: pytest.fail("set-up must not run"))
    assert bootstrap.main(["frobnicate"]) == 2


def test_readme_and_ci_use_the_same_test_command() -> None:
    readme = (bootstrap.ROOT / "README.md").read_text()
    ci = (bootstrap.ROOT / ".ci" / "run").read_text()
    assert "python3 -m spark_me.bootstrap test" in readme
    assert "python3 -m spark_me.bootstrap test" in ci


def test_deps_fingerprint_follows_extras(monkeypatch: pytest.MonkeyPatch) -> None:
    before = bootstrap.deps_fingerprint()
    monkeypatch.setattr(bootstrap, "EXTRAS", "dev")
    assert bootstrap.deps_fingerprint() != before


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"SPARK_ME_CUDA": "1", "TORCH_CUDA_ARCH_LIST": "9.0"}, (True, "9.0")),
        ({"SPARK_ME_CUDA": "0"}, (False, None)),
    ],
)
def test_cuda_build_can_be_forced_either_way(monkeypatch: pytest.MonkeyPatch, env, expected) -> None:
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert bootstrap.want_cuda() == expected


def fake_probe(monkeypatch: pytest.MonkeyPatch, stdout: str, returncode: int = 0) -> list:
    """The venv's torch, as want_cuda asks it for the GPU's compute capability."""
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, returncode, stdout=stdout, stderr="")

    monkeypatch.setattr(bootstrap.subprocess, "run", run)
    return calls


@pytest.mark.parametrize(
    ("gpu", "nvcc", "cuda_home", "arch_list", "expected"),
    [
        ("8.6\n", True, None, None, (True, "8.6")),  # a GPU and nvcc: for that GPU
        ("8.6\n", True, None, "9.0", (True, "9.0")),  # ... unless TORCH_CUDA_ARCH_LIST says otherwise
        ("8.6\n", False, "/opt/cuda", None, (True, "8.6")),  # CUDA_HOME stands in for nvcc on PATH
        ("8.6\n", False, None, None, (False, None)),  # a GPU but no toolkit: CPU build
        ("\n", True, None, "9.0", (False, None)),  # no GPU: CPU build, whatever the toolkit
    ],
)
def test_auto_cuda_rule(monkeypatch: pytest.MonkeyPatch, gpu, nvcc, cuda_home, arch_list, expected) -> None:
    monkeypatch.delenv("SPARK_ME_CUDA", raising=False)
    for key, value in (("CUDA_HOME", cuda_home), ("TORCH_CUDA_ARCH_LIST", arch_list)):
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    which = {"nvcc": "/usr/bin/nvcc"} if nvcc else {}
    monkeypatch.setattr(bootstrap.shutil, "which", which.get)
    calls = fake_probe(monkeypatch, gpu)
    assert bootstrap.want_cuda() == expected
    assert calls and calls[0][0] == str(bootstrap.venv_python())  # asked the venv's torch, not ours


def test_auto_cuda_when_the_probe_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPARK_ME_CUDA", raising=False)
    monkeypatch.setattr(bootstrap.shutil, "which", lambda name: "/usr/bin/nvcc")
    fake_probe(monkeypatch, "8.6\n", returncode=1)  # e.g. torch not importable yet
    assert bootstrap.want_cuda() == (False, None)


@pytest.mark.parametrize(("flag", "expected"), [("true", True), ("YES", True), ("off", False), ("no", False)])
def test_cuda_flag_spellings_skip_the_probe(monkeypatch: pytest.MonkeyPatch, flag, expected) -> None:
    monkeypatch.setenv("SPARK_ME_CUDA", flag)
    calls = fake_probe(monkeypatch, "8.6\n")
    assert bootstrap.want_cuda()[0] is expected and not calls


def test_dependency_stamp(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """pip runs once per pyproject/extras state; a failed install leaves no stamp (so it retries)."""
    monkeypatch.setattr(bootstrap, "VENV", tmp_path)
    pip_calls = []

    def run(cmd, **kwargs):
        pip_calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(bootstrap.subprocess, "run", run)
    bootstrap.ensure_deps()
    stamp = tmp_path / bootstrap.DEPS_STAMP
    assert stamp.read_text() == bootstrap.deps_fingerprint()
    assert any(str(c).endswith(f"[{bootstrap.EXTRAS}]") for cmd in pip_calls for c in cmd)
    count = len(pip_calls)
    bootstrap.ensure_deps()
    assert len(pip_calls) == count  # up to date: nothing run
    monkeypatch.setattr(bootstrap, "EXTRAS", "dev")
    stamp_before = stamp.read_text()

    def failing(cmd, **kwargs):
        raise subprocess.CalledProcessError(1, cmd)

    monkeypatch.setattr(bootstrap.subprocess, "run", failing)
    with pytest.raises(subprocess.CalledProcessError):
        bootstrap.ensure_deps()
    assert stamp.read_text() == stamp_before  # not marked as done
    monkeypatch.setattr(bootstrap.subprocess, "run", run)
    bootstrap.ensure_deps()
    assert len(pip_calls) > count and stamp.read_text() == bootstrap.deps_fingerprint() != stamp_before


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (BuildError("MinkowskiEngine build failed"), 1),
        (subprocess.CalledProcessError(3, ["pip", "install"]), 1),
        (None, 7),  # set-up fine: the job's own exit code
    ],
)
def test_exit_codes(monkeypatch: pytest.MonkeyPatch, error, code: int) -> None:
    def setup(with_detectron2=False, install=bootstrap.ONLINE, need_detectron2=False):
        if error is not None:
            raise error

    monkeypatch.setattr(bootstrap, "setup", setup)
    monkeypatch.setattr(bootstrap, "run_in_venv", lambda args, install=bootstrap.ONLINE: 7)
    assert bootstrap.main(["pretrain", "--epochs", "1"]) == code


def test_test_command_makes_detectron2_mandatory(monkeypatch: pytest.MonkeyPatch) -> None:
    """`bootstrap test` installs Detectron2 and runs pytest with SPARK_ME_REQUIRE_DETECTRON2=1 (the
    detection tests then fail instead of skipping without it); pretraining needs neither."""
    monkeypatch.setenv("SPARK_ME_REQUIRE_DETECTRON2", "unset-by-test")  # restored afterwards
    monkeypatch.setenv("GLIBC_TUNABLES", "kept")  # a user's value wins (restored afterwards)
    setups, jobs = [], []
    monkeypatch.setattr(bootstrap, "setup", lambda with_detectron2=False, **_: setups.append(with_detectron2))

    def run_in_venv(args, install=bootstrap.ONLINE):
        jobs.append((args, os.environ.get("SPARK_ME_REQUIRE_DETECTRON2")))
        return 0

    monkeypatch.setattr(bootstrap, "run_in_venv", run_in_venv)
    monkeypatch.setattr(bootstrap, "parallel_test_args", lambda install=None: ["-n", "2"])
    assert bootstrap.main(["pretrain", "--epochs", "1"]) == 0
    assert bootstrap.main(["test", "-x", "tests/engine"]) == 0
    assert setups == [False, True]
    assert jobs[0] == (["-m", "spark_me.cli", "pretrain", "--epochs", "1"], "unset-by-test")
    assert jobs[1] == (["-m", "pytest", "-n", "2", "-x", "tests/engine"], "1")  # the user's flags win
    assert os.environ["GLIBC_TUNABLES"] == "kept"


def test_test_command_raises_glibcs_mmap_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    """The suite runs with glibc's mmap / trim thresholds at 1 GiB unless GLIBC_TUNABLES is set."""
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)  # restored afterwards
    seen = []
    monkeypatch.setattr(bootstrap, "setup", lambda **_: None)
    monkeypatch.setattr(bootstrap, "parallel_test_args", lambda install=None: [])
    monkeypatch.setattr(
        bootstrap,
        "run_in_venv",
        lambda args, install=None: seen.append(os.environ.get("GLIBC_TUNABLES")) or 0,
    )
    assert bootstrap.main(["pretrain"]) == 0
    assert bootstrap.main(["test"]) == 0
    assert seen == [None, "glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=1073741824"]


@pytest.mark.parametrize(
    ("cores", "has_xdist", "expected"),
    [(2, True, ["-n", "2", "--dist", "worksteal"]), (16, True, ["-n", "4", "--dist", "worksteal"]),
     (1, True, []), (8, False, [])],
)  # fmt: skip
def test_parallel_test_args(monkeypatch: pytest.MonkeyPatch, cores: int, has_xdist: bool, expected) -> None:
    """A pytest-xdist worker per core, at most 4; none without xdist or with one core."""
    monkeypatch.setattr(bootstrap.os, "cpu_count", lambda: cores)
    probes = []

    def run(cmd, **_):
        probes.append(cmd)
        return subprocess.CompletedProcess(cmd, 0 if has_xdist else 1)

    monkeypatch.setattr(bootstrap.subprocess, "run", run)
    assert bootstrap.parallel_test_args() == expected
    assert all(cmd[1:] == ["-c", "import xdist"] for cmd in probes)


def test_setup_without_detectron2_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(bootstrap, "setup", lambda with_detectron2=False, **_: calls.append(with_detectron2))
    assert bootstrap.main(["setup", "--no-detectron2"]) == 0
    assert bootstrap.main(["setup"]) == 0
    assert calls == [False, True]


def test_install_options_leave_the_jobs_arguments(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    seen = []
    monkeypatch.setattr(
        bootstrap, "setup", lambda with_detectron2=False, install=None, **_: seen.append(install)
    )
    monkeypatch.setattr(bootstrap, "run_in_venv", lambda args, install=None: seen.append(args) or 0)
    args = ["pretrain", "--epochs", "1", "--offline", str(tmp_path), "--system-torch", "--no-venv"]
    assert bootstrap.main(args) == 0
    assert seen == [
        bootstrap.Install(tmp_path.resolve(), True, True),
        ["-m", "spark_me.cli", "pretrain", "--epochs", "1"],
    ]


@pytest.mark.parametrize("args", [["setup", "--no-venv"], ["setup", "--offline"]])
def test_bad_install_options_are_one_line_errors(args, caplog: pytest.LogCaptureFixture) -> None:
    assert bootstrap.main(args) == 2
    (record,) = caplog.records
    assert record.getMessage().startswith("error: --") and "\n" not in record.getMessage()


@pytest.mark.parametrize(
    ("version", "ok"),
    [
        ("2.14.1", True),
        ("2.11.0", True),
        ("2.4.0", True),
        ("2.3.1", False),
        ("2.15.0", False),
        ("3.0", False),
    ],
)
def test_supported_torch_range(version: str, ok: bool) -> None:
    if ok:
        bootstrap.check_torch_range(version, "python")
    else:
        with pytest.raises(BuildError, match=r"outside the supported range >=2\.4,<2\.15"):
            bootstrap.check_torch_range(version, "python")


def test_unsupported_system_torch_is_refused_before_anything_is_made(tmp_path) -> None:
    """A real interpreter whose torch is 2.3: one line on stderr, exit 1, no venv, no traceback."""
    fake = tmp_path / "fake"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text("__version__ = '2.3.1'\n")
    (fake / "torch-2.3.1.dist-info").mkdir()
    (fake / "torch-2.3.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: torch\nVersion: 2.3.1\n"
    )
    env = dict(os.environ, PYTHONPATH=f"{fake}:{bootstrap.ROOT}", SPARK_ME_VENV=str(tmp_path / "venv"))
    cmd = [sys.executable, "-m", "spark_me.bootstrap", "setup", "--system-torch"]
    out = subprocess.run(cmd, cwd=bootstrap.ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        f"[spark-me] error: torch 2.3.1 in {sys.executable} is outside the supported range >=2.4,<2.15: "
        "use an interpreter with a supported torch, or drop --system-torch for the pinned one"
    ]
    assert not (tmp_path / "venv").exists()


def test_system_torch_extras_drop_the_pin_and_a_bundle_limits_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bootstrap, "EXTRAS", "pinned,build,dev")
    monkeypatch.delenv("SPARK_ME_EXTRAS", raising=False)
    system = bootstrap.Install(system_torch=True)
    assert bootstrap.effective_extras(system, None) == "build,dev"
    manifest = {"extras": ["build"], "torch": "system"}
    assert bootstrap.effective_extras(system, manifest) == "build"  # the bundle's, by default
    monkeypatch.setenv("SPARK_ME_EXTRAS", "build,dev")
    with pytest.raises(BuildError, match="no extra dev"):
        bootstrap.effective_extras(system, manifest)
