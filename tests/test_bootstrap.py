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
