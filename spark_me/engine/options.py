"""Reading a run's options from a YAML file into a config dataclass (pretraining's conventions).

Kept apart from any one command so that `finetune` and `probe` read YAML exactly as `pretrain` does:
unknown keys are refused by name, and floats written as `1e-3` are numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

import yaml


def read_yaml_options(path: Path, cls: type) -> dict[str, Any]:
    """The mapping in `path`, checked against the fields of dataclass `cls`.

    PyYAML follows YAML 1.1, where `1e-3` (no dot) is a string; a user who writes `lr: 1e-3` means
    the number, so float fields take any string that Python reads as a float.
    """
    if not path.is_file():
        raise FileNotFoundError(f"no such config file: {path}")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path} holds a {type(values).__name__}, expected a mapping of options")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ValueError(f"unknown option(s) in {path}: {', '.join(sorted(unknown))}")
    out = dict(values)
    for name, value in values.items():
        if isinstance(value, str) and str(fields[name].type).startswith("float"):
            with contextlib.suppress(ValueError):  # else left as it is: the type check names it
                out[name] = float(value)
    return out
