"""The pieces of a mid-epoch position: the resumable sampler and per-sample seeded augmentation."""

from __future__ import annotations

import io
import random

import numpy as np
import torch
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import Dataset, DistributedSampler

from spark_me.engine.epoch_position import (
    EpochPosition,
    RankState,
    ResumableRanks,
    ResumableSampler,
    SeededSamples,
)


class Noise(Dataset):
    """Each item is a draw from torch's, Python's and numpy's global random states (like timm's
    augmentations: crops and erasing draw from the first two, RandAugment from numpy)."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int) -> tuple[float, float, float]:
        return float(torch.rand(())), random.random(), float(np.random.rand())


def test_sampler_is_distributed_samplers_order_and_starts_anywhere() -> None:
    data = list(range(23))
    for rank in (0, 1, 2):
        ours, theirs = (
            ResumableSampler(data, 3, rank, seed=5),
            DistributedSampler(data, num_replicas=3, rank=rank, shuffle=True, seed=5, drop_last=True),
        )
        ours.set_epoch(4)
        theirs.set_epoch(4)
        full = list(ours)
        assert full == list(theirs) and len(ours) == len(theirs) == 7
        ours.set_epoch(4, start=3)
        assert list(ours) == full[3:] and len(ours) == 7  # len stays the epoch's
        ours.set_epoch(4, start=2, order=torch.arange(23).flip(0))  # a stored order wins
        assert list(ours) == list(range(22 - rank, -1, -3))[2:7]


def test_seeded_samples_depend_on_seed_epoch_index_only() -> None:
    samples = SeededSamples(Noise(), seed=1)
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    state = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    forward = [samples[i] for i in range(10)]
    assert torch.equal(torch.get_rng_state(), state[0]) and random.getstate() == state[1]  # untouched
    assert (np.random.get_state()[1] == state[2]).all()
    backward = [samples[i] for i in reversed(range(10))][::-1]
    assert forward == backward  # the order (or worker) that loads them does not matter
    assert len(set(forward)) == 10 and len({f[2] for f in forward}) == 10  # every index its own draws
    samples.set_epoch(1)
    assert all(a != b for a, b in zip(forward, [samples[i] for i in range(10)], strict=True))
    assert SeededSamples(Noise(), seed=2)[0] != forward[0]


def test_position_round_trip_and_layout_check() -> None:
    rank = RankState.capture(torch.device("cpu"), [1.0, 0.5])
    pos = EpochPosition(3, 8, torch.randperm(12), [rank], {"world_size": 1, "batch_size": 4})
    back = EpochPosition.from_dict(pos.to_dict())
    assert (back.epoch, back.batch, back.layout) == (3, 8, pos.layout)
    assert torch.equal(back.order, pos.order) and back.ranks[0].losses == [1.0, 0.5]
    assert torch.equal(back.ranks[0].rng_cpu, rank.rng_cpu)
    assert back.mismatch({"world_size": 1, "batch_size": 4}) is None
    assert back.mismatch({"world_size": 2, "batch_size": 4}) == "world_size 1 -> 2"


def test_resumable_ranks_is_repeat_aug_samplers_order_and_starts_anywhere() -> None:
    """timm's RepeatAugSampler (3 repeats, 3 processes) wrapped: the same order per process, a
    start position, a stored order ([processes, per process]) that wins over the sampler's own."""
    data = list(range(23))
    shares = []
    for rank in (0, 1, 2):
        theirs = RepeatAugSampler(data, num_replicas=3, rank=rank, num_repeats=3)
        ours = ResumableRanks(RepeatAugSampler(data, num_replicas=3, rank=rank, num_repeats=3))
        theirs.set_epoch(4)
        ours.set_epoch(4)
        full = list(ours)
        assert full == list(theirs) and len(ours) == len(theirs) == 8
        shares.append(full)
        order = ours.epoch_order()
        assert order.shape == (3, 8) and order[rank].tolist() == full  # every process's share, here
        ours.set_epoch(4, start=5)
        assert list(ours) == full[5:] and len(ours) == 8
        ours.set_epoch(4, start=6, order=order.flip(1))
        assert list(ours) == full[::-1][6:]
    assert torch.equal(torch.tensor(shares), order)


def draws() -> tuple[float, ...]:
    """One draw of each kind from every global random stream (Gaussians use the caches)."""
    return (
        float(torch.rand(())),
        np.random.normal(),
        np.random.rand(),
        random.gauss(0.0, 1.0),
        random.random(),
    )


def test_rank_state_restores_torch_numpy_and_python_random_states() -> None:
    """A RankState saved and loaded as a checkpoint is (weights_only=True) puts every random
    stream back where it was, including numpy's and Python's Gaussian caches."""
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.normal(), random.gauss(0.0, 1.0)  # leaves a cached second Gaussian in each
    saved = RankState.capture(torch.device("cpu"), [0.5])
    buffer = io.BytesIO()
    torch.save(saved.to_dict(), buffer)
    want = draws()
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    buffer.seek(0)
    RankState.from_dict(torch.load(buffer, weights_only=True)).restore(torch.device("cpu"))
    assert draws() == want
