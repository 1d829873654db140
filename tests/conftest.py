"""Shared fixtures: deterministic randomness and float64 where equality is the point."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def available_devices() -> list:
    """CPU, and CUDA marked `cuda`: deselected by default (addopts `-m "not cuda"`), selected by
    `pytest -m cuda` (gpu-check), where it fails rather than skips if the GPU or ME's CUDA is absent."""
    return ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A `device` argument runs the test on the CPU, and on CUDA when `-m cuda` selects it."""
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", available_devices())
