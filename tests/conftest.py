"""Shared fixtures: deterministic randomness and float64 where equality is the point."""

from __future__ import annotations

import os

import pytest
import torch
import torch._inductor.config as inductor_config


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
        # inductor compiles its C++ in a pool of processes, one per core, each importing torch:
        # ~8 CPU-s a pool, while the suite's workers already keep every core busy (the compile
        # tests: 59 -> 51 CPU-s). Here and in the commands the tests start.
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
        inductor_config.compile_threads = int(os.environ["TORCHINDUCTOR_COMPILE_THREADS"])


@pytest.hookimpl(trylast=True)  # after `-m "not cuda"` has deselected: the split counts what runs
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deal the `heavy` tests (whole commands in child processes) out evenly to the xdist workers,
    each worker's first. `bootstrap test` runs `--dist worksteal`, which gives worker i the i-th of
    W contiguous, equal parts of this order, and lets a worker that runs dry take the tail of the
    longest queue. So the order is W parts, each its share of the heavy tests (round robin) then
    a contiguous run of the light ones: the long tests start at once on every worker and the end of
    the run is short tests that stealing balances. (With `--dist load` and the heavy tests merely
    first, all of them went to one worker's first batch: that worker ran 155 tests for 621 s while
    the other finished its 1113 in 391 s.) Every worker computes the same order (xdist requires it)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    heavy = {id(item) for item in items if item.get_closest_marker("heavy") is not None}
    items[:] = deal(items, lambda item: id(item) in heavy, workers)


def deal(items: list, is_heavy, workers: int) -> list:
    """`items` in W contiguous parts of worksteal's sizes, each its round-robin share of the heavy
    items then the next run of the light ones, in their order (fixtures stay together)."""
    heavy = [item for item in items if is_heavy(item)]
    light = [item for item in items if not is_heavy(item)]
    remaining, ordered = len(items), []
    for i in range(workers):
        size = remaining // (workers - i)  # worksteal's initial split (xdist/scheduler/worksteal.py)
        remaining -= size
        share = heavy[i::workers][:size]
        ordered += share + light[: size - len(share)]
        light = light[size - len(share) :]
    dealt = {id(item) for item in ordered}
    return ordered + [item for item in heavy if id(item) not in dealt] + light


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
