"""What the user hands the pretraining command besides flags: YAML text (the --config file,
--model_kwargs) and the output folder, each checked with a one-line error that says where the
problem is, instead of a parser's or the filesystem's traceback deep inside the run."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import yaml


def yaml_mapping(text: str) -> dict:
    """--model_kwargs: a YAML mapping, or an argparse error (one line) saying what is wrong."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise argparse.ArgumentTypeError(f"not YAML ({yaml_problem(err)}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a YAML mapping such as '{{depths: [1,1,3,1]}}': {text!r}")
    return value


def yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's multi-line report as one line: where (line, column) and what was expected."""
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem, context = getattr(err, "problem", None), getattr(err, "context", None)
    what = (problem or type(err).__name__) + (f" ({context})" if context else "")
    return where + " ".join(what.split())


def read_config_file(path: Path) -> dict[str, Any]:
    """The YAML file's options; one-line ValueErrors for a missing file, invalid YAML or a
    document that is not a mapping of option: value."""
    if not path.is_file():
        raise FileNotFoundError(f"no such config file: {path}")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {yaml_problem(err)}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} cannot be read as a YAML text file ({err})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(
            f"{path} holds a YAML {type(values).__name__}, expected a mapping of option: value "
            "(e.g. 'epochs: 100' on each line)"
        )
    return values


def folder_problem(folder: Path) -> str | None:
    """Why nothing could be written into `folder`, or None: it (or its nearest existing parent, when
    it does not exist yet) must be a writable folder. Tried by creating and removing a temporary
    file there, which also catches read-only filesystems (os.access cannot, as root)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        return f"{existing} is not writable ({err.strerror or err})"
    return None


def output_dir_problem(path: str | Path, flag: str = "--output_dir") -> str | None:
    """Why the run could not write into folder `path`, or None."""
    problem = folder_problem(Path(path))
    return f"{flag} {path}: {problem}" if problem else None


def output_file_problem(path: str | Path, flag: str = "--output") -> str | None:
    """Why file `path` could not be written, or None."""
    path = Path(path)
    if path.is_dir():
        return f"{flag} {path} is a folder; give a file name"
    problem = folder_problem(path.parent)
    return f"{flag} {path}: {problem}" if problem else None
