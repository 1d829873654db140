"""torchrun / DDP set-up from the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init(device: str | None = None) -> DistEnv:
    """One process per GPU under torchrun (nccl), or gloo on CPU; a plain run is world size 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
        log.info("process %d/%d on %s", rank, world, dev)
    return DistEnv(rank, world, local, dev)


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_mean(value: float, env: DistEnv) -> float:
    if not env.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_collective_device(env))
    dist.all_reduce(t)
    return float(t) / env.world_size


def _collective_device(env: DistEnv) -> torch.device:
    """nccl reduces CUDA tensors only, gloo CPU ones."""
    return env.device if env.device.type == "cuda" else torch.device("cpu")


def any_true(flag: bool, env: DistEnv) -> bool:
    """True on every process when `flag` is True on any of them (an all-reduce of one integer)."""
    if not env.distributed:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32, device=_collective_device(env))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_gather(obj: object, env: DistEnv) -> list:
    """Every process's `obj` (picklable), indexed by rank, on every process."""
    if not env.distributed:
        return [obj]
    out: list = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def from_main(obj: object, env: DistEnv) -> object:
    """The main process's `obj` on every process (decisions taken once, by rank 0)."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def cleanup(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, env: DistEnv) -> torch.nn.Module:
    """`model` in DistributedDataParallel when the run is distributed, else `model` itself."""
    if not env.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[env.device] if env.device.type == "cuda" else None)
