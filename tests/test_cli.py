"""The `spark-me` command line: the smoke check, help, unknown commands."""

from __future__ import annotations

import logging

import pytest

from spark_me import cli


def test_smoke_check_passes(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        assert cli.main(["smoke"]) == 0
    assert "smoke check passed" in caplog.text
    assert caplog.text.count("vs F.conv2d") == 6


def test_every_subcommand_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("pretrain", "bench"):  # their flags live in their own parsers
        with pytest.raises(SystemExit) as exc:
            cli.main([command, "--help"])
        assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--mask_ratio" in out and "--ratios" in out


def test_unknown_subcommand_is_an_error() -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["nonsense"])
    assert exc.value.code == 2
