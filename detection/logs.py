"""Detectron2's console output, made readable: plain text off a terminal, the long dumps in the file.

Detectron2's `default_setup` logs its environment table, the whole config and (through the trainer)
the printed model, several hundred lines, on the console in colour even when the console is a file.
Here the console handler drops those dumps unless `--verbose` (they stay in OUTPUT_DIR/log.txt)
and uses Detectron2's plain format when its stream is not a terminal.
"""

from __future__ import annotations

import logging

# start of the messages that are the long dumps (environment table, config file, full config, model)
DUMPS = ("Environment info:", "Contents of args.config_file", "Running with full config", "Model:\n")
PLAIN = logging.Formatter("[%(asctime)s] %(name)s %(levelname)s: %(message)s", datefmt="%m/%d %H:%M:%S")


class _NoDumps(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(DUMPS)


def tidy_console(verbose: bool, names: tuple[str, ...] = ("detectron2", "fvcore")) -> None:
    """Adjust the console handlers Detectron2 attached to its loggers (file handlers untouched)."""
    for name in names:
        for handler in logging.getLogger(name).handlers:
            stream = getattr(handler, "stream", None)
            if stream is None or getattr(stream, "name", "") not in ("<stdout>", "<stderr>"):
                continue  # a log file
            if not (hasattr(stream, "isatty") and stream.isatty()):
                handler.setFormatter(PLAIN)
            if not verbose:
                handler.addFilter(_NoDumps())
