"""Detectron2's console: plain text off a terminal, the long dumps only with --verbose."""

from __future__ import annotations

import io
import logging

import pytest

from detection.logs import tidy_console


class Console(io.StringIO):
    """A stdout that is redirected to a file (not a terminal)."""

    name = "<stdout>"

    def isatty(self) -> bool:
        return False


@pytest.mark.parametrize("verbose", [False, True])
def test_console_is_plain_and_without_dumps_unless_verbose(verbose: bool) -> None:
    logger = logging.getLogger(f"d2_console_test_{verbose}")
    logger.setLevel(logging.INFO)
    console, log_file = Console(), io.StringIO()  # the file handler's stream has no console name
    for stream in (console, log_file):
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter("\x1b[32m%(name)s\x1b[0m %(message)s"))  # as Detectron2's
        logger.addHandler(handler)
    tidy_console(verbose, names=(logger.name,))
    logger.info("Running with full config:\nMODEL: ...")
    logger.info("Starting training from iteration 0")
    shown = console.getvalue()
    assert "\x1b[" not in shown and "Starting training" in shown
    assert ("Running with full config" in shown) == verbose
    assert "Running with full config" in log_file.getvalue() and "\x1b[" in log_file.getvalue()  # untouched
