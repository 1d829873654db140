"""Where an epoch stands, so that a run stopped between two optimiser steps continues exactly.

Three things decide what the rest of an epoch computes: which samples come next (the sampler's
order and position), how each sample is augmented, and the random numbers drawn in the main
process (masks, drop-path, Mixup/CutMix). The first is stored as the epoch's order and a position;
the second is made a pure function of (seed, epoch, sample index) by `SeededSamples`, so it no
longer depends on which process or DataLoader worker loads the sample nor on how far that worker
had got (a worker's random state cannot be saved from the main process); the third is each
process's torch, numpy and Python random states, saved at the step boundary and put back when the
epoch resumes. Used by pretraining and fine-tuning alike.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler


class SeededSamples(Dataset):
    """`dataset[i]` drawn under its own seed, a hash of (seed, epoch, i), with the caller's torch
    (CPU), numpy and `random` states left as they were: the augmentation of a sample is the same
    whatever process, worker or resume loads it, and loading never moves the main process's random
    streams. (timm's RandAugment draws from numpy, its crops and erasing from `random` and torch.)"""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Call before `iter(loader)`: workers receive a copy of this object when they start."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        seed = int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0])
        saved, saved_np = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(saved)
                np.random.set_state(saved_np)


class ResumableSampler(DistributedSampler):
    """DistributedSampler (shuffled, drop_last) that can start an epoch at a position and replay a
    stored order. `len()` stays the full epoch's so that steps per epoch do not change on resume."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.start = 0
        self.order: torch.Tensor | None = None

    def set_epoch(self, epoch: int, start: int = 0, order: torch.Tensor | None = None) -> None:
        """`start`: samples of this process already used; `order`: the epoch's stored order, if any."""
        super().set_epoch(epoch)
        self.start, self.order = start, order

    def epoch_order(self) -> torch.Tensor:
        """[len(dataset)] int64: the epoch's permutation of all samples (before the per-rank split),
        the same one DistributedSampler draws from seed + epoch."""
        if self.order is not None:
            return self.order
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.dataset), generator=gen)

    def __iter__(self):
        mine = self.epoch_order()[: self.total_size][self.rank :: self.num_replicas]
        return iter(mine[self.start :].tolist())


class ResumableRanks(Sampler):
    """A sampler whose order is a function of (epoch, rank) alone, timm's RepeatAugSampler, made
    resumable like `ResumableSampler`: it can start an epoch at a position and replay a stored
    order. Its order, `epoch_order()`, is every process's indices ([num_replicas, len(sampler)]
    int64): the whole-epoch order before the split is internal to the wrapped sampler."""

    def __init__(self, sampler: Sampler) -> None:
        self.sampler, self.start = sampler, 0
        self.order: torch.Tensor | None = None

    def set_epoch(self, epoch: int, start: int = 0, order: torch.Tensor | None = None) -> None:
        self.sampler.set_epoch(epoch)
        self.start, self.order = start, order

    def epoch_order(self) -> torch.Tensor:
        if self.order is not None:
            return self.order
        rows = []
        for rank in range(self.sampler.num_replicas):  # another process's share: the same sampler, its rank
            other = copy.copy(self.sampler)
            other.rank = rank
            rows.append(torch.tensor(list(other), dtype=torch.int64))
        return torch.stack(rows)

    def __iter__(self):
        mine = self.order[self.sampler.rank].tolist() if self.order is not None else list(self.sampler)
        return iter(mine[self.start :])

    def __len__(self) -> int:
        return len(self.sampler)


def numpy_state() -> dict:
    """numpy's global (legacy) random state as tensors and plain types (for weights_only loading)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "kind": kind,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "gauss": float(gauss),
    }


def set_numpy_state(d: dict) -> None:
    keys = d["keys"].numpy().astype(np.uint32)
    np.random.set_state((d["kind"], keys, d["pos"], d["has_gauss"], d["gauss"]))


def python_state() -> dict:
    version, internal, gauss_next = random.getstate()
    return {
        "version": version,
        "internal": torch.tensor(internal, dtype=torch.int64),
        "gauss_next": gauss_next,
    }


def set_python_state(d: dict) -> None:
    random.setstate((d["version"], tuple(d["internal"].tolist()), d["gauss_next"]))


@dataclass
class RankState:
    """One process's part of a mid-epoch position: its random states (torch CPU and CUDA, numpy's
    global state that timm's Mixup/CutMix draw from, Python's `random`) and the losses of the
    epoch so far (so the epoch's mean loss comes out the same)."""

    rng_cpu: torch.Tensor
    rng_cuda: torch.Tensor | None
    losses: list[float] = field(default_factory=list)
    rng_numpy: dict | None = None  # numpy_state(); None in a state saved before it was kept
    rng_python: dict | None = None  # python_state(); idem

    @classmethod
    def capture(cls, device: torch.device, losses: list[float]) -> RankState:
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(torch.get_rng_state(), cuda, list(losses), numpy_state(), python_state())

    def restore(self, device: torch.device) -> None:
        torch.set_rng_state(self.rng_cpu)
        if device.type == "cuda" and self.rng_cuda is not None:
            torch.cuda.set_rng_state(self.rng_cuda, device)
        if self.rng_numpy is not None:
            set_numpy_state(self.rng_numpy)
        if self.rng_python is not None:
            set_python_state(self.rng_python)

    def to_dict(self) -> dict:
        """Tensors and plain types only (checkpoints load with weights_only=True)."""
        return {
            "rng_cpu": self.rng_cpu,
            "rng_cuda": self.rng_cuda,
            "losses": torch.tensor(self.losses, dtype=torch.float64),
            "rng_numpy": self.rng_numpy,
            "rng_python": self.rng_python,
        }

    @classmethod
    def from_dict(cls, d: dict) -> RankState:
        return cls(
            d["rng_cpu"], d.get("rng_cuda"), d["losses"].tolist(), d.get("rng_numpy"), d.get("rng_python")
        )


@dataclass
class EpochPosition:
    """A step boundary inside an epoch: `batch` micro-batches of each process are done.

    `order` is the epoch's sample order ([len(dataset)] int64), `ranks` one RankState per process;
    `layout` (world size, batch size, accum_iter, samples) must match for the position to mean the
    same thing in the resumed run.
    """

    epoch: int
    batch: int
    order: torch.Tensor
    ranks: list[RankState]
    layout: dict[str, int]

    def to_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "order": self.order,
            "ranks": [r.to_dict() for r in self.ranks],
            "layout": dict(self.layout),
        }

    @classmethod
    def from_dict(cls, d: dict) -> EpochPosition:
        ranks = [RankState.from_dict(r) for r in d["ranks"]]
        return cls(int(d["epoch"]), int(d["batch"]), d["order"], ranks, dict(d["layout"]))

    def mismatch(self, layout: dict[str, int]) -> str | None:
        """Why this position cannot continue in a run of `layout`, or None."""
        differ = [f"{k} {self.layout.get(k)} -> {v}" for k, v in layout.items() if self.layout.get(k) != v]
        return ", ".join(differ) or None
