"""The pieces of a mid-epoch position: the resumable sampler and per-sample seeded augmentation."""

from __future__ import annotations

import random

import torch
from torch.utils.data import Dataset, DistributedSampler

from spark_me.engine.epoch_position import EpochPosition, RankState, ResumableSampler, SeededSamples


class Noise(Dataset):
    """Each item is a draw from torch's and Python's global random state (like an augmentation)."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int) -> tuple[float, float]:
        return float(torch.rand(())), random.random()


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
    state = (torch.get_rng_state(), random.getstate())
    forward = [samples[i] for i in range(10)]
    assert torch.equal(torch.get_rng_state(), state[0]) and random.getstate() == state[1]  # untouched
    backward = [samples[i] for i in reversed(range(10))][::-1]
    assert forward == backward  # the order (or worker) that loads them does not matter
    assert len(set(forward)) == 10  # every index its own draw
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
