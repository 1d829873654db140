"""Shared fixtures: deterministic randomness and float64 where equality is the point."""

from __future__ import annotations

import os

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (`bootstrap test` runs one worker per core, up to 4), each worker gets an
    equal share of the cores: torch's own threads, and OMP_NUM_THREADS for the processes a test
    starts (CLI runs, torchrun). Without it every worker would run as many threads as there are
    cores and the suite would oversubscribe the machine (OpenMP's spinning threads then make steps
    up to 10x slower). This runs before any test computes, so oneDNN's pool starts at this size.
    Tests that need a given thread count set it themselves (the 2-thread strided-conv regression
    in test_dataflows.py runs in a child started with it)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        share = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(share)
        torch.set_num_threads(share)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`heavy` tests first (a stable sort: the rest keep their order). pytest-xdist hands tests out
    in this order, so the long ones start while every worker is free instead of one worker
    finishing them alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("heavy") is None)


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
