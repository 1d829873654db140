"""An ArgumentParser whose errors are one line.

argparse answers a bad flag with the whole usage block (a dozen lines for `pretrain`) and then the
error; the error is the line that matters, and `--help` still shows the usage.
"""

from __future__ import annotations

import argparse
from typing import NoReturn


class OneLineErrorParser(argparse.ArgumentParser):
    """`prog: error: message (see prog --help)` on stderr, exit status 2 (argparse's own)."""

    def error(self, message: str) -> NoReturn:
        line = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {line} (see {self.prog} --help)\n")
