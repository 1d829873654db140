"""Reading a run's options from a YAML file into a config dataclass (pretraining's conventions).

Kept apart from any one command so that `finetune` and `probe` read YAML exactly as `pretrain` does:
unknown keys are refused by name, and floats written as `1e-3` are numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

from spark_me.engine.config_input import read_config_file


def read_yaml_options(path: Path, cls: type) -> dict[str, Any]:
    """The mapping in `path`, checked against the fields of dataclass `cls`.

    PyYAML follows YAML 1.1, where `1e-3` (no dot) is a string; a user who writes `lr: 1e-3` means
    the number, so float fields take any string that Python reads as a float.
    """
    values = read_config_file(path)  # one-line errors: missing, invalid YAML (where), not a mapping
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ValueError(f"unknown option(s) in {path}: {', '.join(sorted(map(str, unknown)))}")
    out = dict(values)
    for name, value in values.items():
        if isinstance(value, str) and str(fields[name].type).startswith("float"):
            with contextlib.suppress(ValueError):  # else left as it is: the type check names it
                out[name] = float(value)
    return out
