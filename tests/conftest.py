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


def available_devices() -> list[str]:
    """CPU always; CUDA when torch sees a GPU *and* MinkowskiEngine was built with CUDA."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        import MinkowskiEngine as ME

        if ME.is_cuda_available():
            devices.append("cuda")
    return devices


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A `device` argument runs the test on every available device (no CUDA ids on CPU machines)."""
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", available_devices())
