"""The `spark-me` command line: a real smoke check, and honest stubs for what has not landed."""

from __future__ import annotations

import logging

import pytest

from spark_me import cli


def test_smoke_check_passes(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        assert cli.main(["smoke"]) == 0
    assert "smoke check passed" in caplog.text
    assert caplog.text.count("vs F.conv2d") == 6


@pytest.mark.parametrize("command", sorted(cli.NOT_YET))
def test_unfinished_subcommands_say_so_and_fail(command: str, caplog: pytest.LogCaptureFixture) -> None:
    assert cli.main([command, "--anything"]) == 2
    assert "not implemented yet" in caplog.text


def test_unknown_subcommand_is_an_error() -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["nonsense"])
    assert exc.value.code == 2
