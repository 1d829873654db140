"""Pairs of (sparse encoder, masked-dense reference) with identical, non-trivial weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import spark_me
from spark_me.models.reference import MaskedDenseEncoder, create_reference

from .._fixtures import randomize

# Small but structurally complete configurations (every block type, both MLP layouts, GRN, gamma).
TINY = {
    "resnet18": {},
    "resnet50": dict(layers=(1, 1, 1, 1)),
    "convnext_atto": dict(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32)),  # conv_mlp, layer scale
    "convnext_tiny": dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32)),  # Linear MLP, layer scale
    "convnextv2_atto": dict(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32)),  # conv_mlp, GRN
    "convnextv2_tiny": dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32)),  # Linear MLP, GRN
}


def make_pair(arch: str, gen: torch.Generator, **kwargs) -> tuple[nn.Module, MaskedDenseEncoder]:
    kw = TINY[arch] | kwargs
    sparse = spark_me.create_encoder(arch, **kw)
    randomize(sparse, gen)
    reference = create_reference(arch, **kw)
    result = reference.model.load_state_dict(sparse.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert set(result.missing_keys) <= {"head.norm.weight", "head.norm.bias"}
    return sparse, reference


def mask_for(images: torch.Tensor, ratio: float, gen: torch.Generator) -> torch.Tensor:
    b, _, h, w = images.shape
    return spark_me.random_mask(b, h, w, ratio, generator=gen)


@pytest.fixture
def pair_factory(gen: torch.Generator):
    return lambda arch, **kw: make_pair(arch, gen, **kw)
