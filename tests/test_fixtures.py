"""The shared randomiser makes feature comparisons sensitive to every tensor inside the blocks."""

from __future__ import annotations

import pytest
import torch

import spark_me

from ._fixtures import MAGNITUDE, RUNNING_VAR, SELF_TEST, max_rel_err, perturbations, randomize

TOL = 1e-5  # the tolerance of the float32 equivalence tests (converters, detection, benchmarks)


@pytest.mark.parametrize("arch", sorted(SELF_TEST))
def test_randomize_moves_every_norm_and_scale_away_from_0_and_1(gen, arch: str) -> None:
    encoder = spark_me.create_encoder(arch, **SELF_TEST[arch])
    randomize(encoder, gen)
    seen = 0
    for name, v in encoder.state_dict().items():
        if not v.is_floating_point() or sum(d > 1 for d in v.shape) > 1:
            continue
        low, high = RUNNING_VAR if name.endswith("running_var") else MAGNITUDE
        assert bool(((v.abs() >= low) & (v.abs() <= high)).all()), name
        seen += 1
    assert seen > 10


@pytest.mark.parametrize("arch", sorted(SELF_TEST))
def test_a_swapped_or_dropped_tensor_fails_the_feature_comparison(gen, arch: str) -> None:
    """What every "export -> other framework gives the same features" test relies on."""
    kw = SELF_TEST[arch]
    encoder = spark_me.create_encoder(arch, **kw).eval()
    randomize(encoder, gen)
    state = encoder.state_dict()
    fresh = spark_me.create_encoder(arch, **kw).state_dict()
    images = torch.randn(2, 3, 64, 96, generator=gen)
    active = torch.ones(2, 2, 3, dtype=torch.bool)
    with torch.no_grad():
        want = encoder(images, active)
    for what, wrong in perturbations(arch, state, fresh):
        other = spark_me.create_encoder(arch, **kw).eval()
        other.load_state_dict(wrong)
        with torch.no_grad():
            got = other(images, active)
        err = max(max_rel_err(g, w) for g, w in zip(got, want, strict=True))
        assert err > 100 * TOL, f"{arch}: {what} changes the features by only {err:.1e}"
