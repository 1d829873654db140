"""YAML text and output folders: one-line reasons that say where the problem is."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from spark_me.engine.config_input import (
    output_dir_problem,
    output_file_problem,
    read_config_file,
    yaml_mapping,
)


def test_yaml_errors_name_line_column_and_what_was_expected(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 3\nblr: 1e-3\narch: resnet50: x\n")
    with pytest.raises(ValueError) as err:
        read_config_file(path)
    assert (
        str(err.value) == f"{path} is not valid YAML: line 3, column 15: mapping values are not allowed here"
    )
    path.write_text("")
    assert read_config_file(path) == {}
    path.write_text("just a string")
    with pytest.raises(ValueError, match="holds a YAML str, expected a mapping"):
        read_config_file(path)
    assert yaml_mapping("{depths: [1, 1, 3, 1]}") == {"depths": [1, 1, 3, 1]}
    with pytest.raises(argparse.ArgumentTypeError, match=r"line 1, column 17: expected .*flow sequence"):
        yaml_mapping("{depths: [1 2: 3}")


def test_output_paths(tmp_path: Path) -> None:
    a_file = tmp_path / "f"
    a_file.write_text("x")
    assert output_dir_problem(tmp_path / "new" / "deeper") is None  # created later
    assert output_dir_problem(a_file) == f"--output_dir {a_file}: {a_file} is a file, not a folder"
    assert "is a file" in output_dir_problem(a_file / "sub")
    assert output_file_problem(tmp_path / "out.png") is None
    assert output_file_problem(tmp_path, "-o") == f"-o {tmp_path} is a folder; give a file name"
    assert not list(tmp_path.glob("tmp*"))  # the probe file is gone again
