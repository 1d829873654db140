"""The set-up entry point: its commands and its dependency stamp."""

from __future__ import annotations

import pytest

from spark_me import bootstrap


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


def test_auto_cuda_follows_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset: CUDA exactly when the venv's torch sees a GPU and nvcc is there (CPU build here)."""
    import os
    import shutil

    import torch

    monkeypatch.delenv("SPARK_ME_CUDA", raising=False)
    expected = torch.cuda.is_available() and bool(os.environ.get("CUDA_HOME") or shutil.which("nvcc"))
    assert bootstrap.want_cuda()[0] is expected


def test_setup_without_detectron2_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(bootstrap, "setup", lambda with_detectron2=False: calls.append(with_detectron2))
    assert bootstrap.main(["setup", "--no-detectron2"]) == 0
    assert bootstrap.main(["setup"]) == 0
    assert calls == [False, True]
