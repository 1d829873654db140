"""benchmarks.encoder.saved_mib counts the activations autograd saves, once per storage, and
neither the parameters nor their low-precision copies (autocast's weight casts)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from benchmarks.encoder import saved_mib


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_activations_counted_parameters_and_their_casts_not(amp) -> None:
    layer = nn.Linear(8, 16)
    x = torch.randn(32, 8, requires_grad=True)  # so that linear saves the weight (for grad x)
    itemsize = 2 if amp is not None else 4

    def loss() -> torch.Tensor:
        with torch.autocast("cpu", dtype=amp) if amp is not None else contextlib.nullcontext():
            return torch.relu(layer(x)).float().sum()

    # linear saves its input (cast under autocast: a copy of x) and relu its output; the weight and
    # bias (or their bf16 copies, 16*8 and 16 elements) are not counted
    expected = (32 * 8 + 32 * 16) * itemsize
    assert saved_mib(loss, list(layer.parameters())) * 2**20 == expected
