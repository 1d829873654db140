"""SparK's random mask on the stride-32 grid."""

from __future__ import annotations

import pytest
import torch

from spark_me.masking import keep_count, random_mask


@pytest.mark.parametrize(("h", "w", "ratio"), [(224, 224, 0.6), (64, 96, 0.6), (32, 160, 0.5), (96, 64, 0.0)])
def test_same_number_kept_in_every_image(gen, h: int, w: int, ratio: float) -> None:
    active = random_mask(5, h, w, ratio, generator=gen)
    assert active.shape == (5, h // 32, w // 32) and active.dtype == torch.bool
    expected = round((h // 32) * (w // 32) * (1 - ratio))
    assert active.flatten(1).sum(1).tolist() == [expected] * 5


def test_masks_differ_between_images_and_calls(gen) -> None:
    a = random_mask(8, 224, 224, 0.6, generator=gen)
    b = random_mask(8, 224, 224, 0.6, generator=gen)
    assert not torch.equal(a, b)
    assert len({tuple(m.flatten().tolist()) for m in a}) > 1


def test_seeded_generator_reproduces(gen) -> None:
    one = random_mask(2, 64, 64, 0.5, generator=torch.Generator().manual_seed(3))
    two = random_mask(2, 64, 64, 0.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(one, two)


def test_bad_sizes_and_ratios() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        random_mask(1, 100, 64)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        keep_count(7, 7, 1.0)
    with pytest.raises(ValueError, match="keeps no cell"):
        random_mask(1, 32, 32, 0.6)
