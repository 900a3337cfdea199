"""The process group under ``torchrun``: rank, world size, and small collectives the loop needs."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
import torch.distributed as dist

from .errors import TrainError


@dataclasses.dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


MAX_DEFAULT_WORKERS = 8
"""The most DataLoader workers a process gets by default: beyond this, decoding rarely limits a single GPU, and
every worker holds its own copy of the dataset's state."""


def default_workers() -> int:
    """DataLoader workers per training process when ``--workers`` is not given: the cores this process may use,
    shared with the other processes of its node under ``torchrun`` (``LOCAL_WORLD_SIZE``), less one for the
    training process itself, at most :data:`MAX_DEFAULT_WORKERS`; 0 (loading in the training process) only with a
    single core per process."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_process = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(per_process - 1, MAX_DEFAULT_WORKERS))


def process_group_backend(device: str) -> str:
    """gloo on the CPU; on CUDA, NCCL for tensors on the GPU (DDP's gradients) and gloo for the loop's small
    CPU-side collectives (epoch metrics, broadcast objects, barriers), which NCCL cannot carry."""
    return "cpu:gloo,cuda:nccl" if device.startswith("cuda") else "gloo"


def init_world(device: str) -> World:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1); on CUDA each rank's current device is
    ``cuda:LOCAL_RANK``."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(process_group_backend(device))
    return World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=local_rank)


def resolve_device(device: str) -> str:
    """``"auto"``: ``"cuda"`` when CUDA is available, else ``"cpu"``; a CUDA device asked for on a machine
    without one is refused with what to pass instead."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError as error:
        raise TrainError(f"--device {device}: not a device ({error}); pass auto, cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"--device {device} was asked for but CUDA is not available here: pass --device cpu "
                         "(or auto)")
    return device


def device_for(device: str, world: World) -> torch.device:
    if device == "cuda" and world.distributed:
        return torch.device("cuda", world.local_rank)
    return torch.device(device)


def all_sum(values: list[float], world: World) -> list[float]:
    """Element-wise sum over ranks (float64)."""
    if not world.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.tolist()


def broadcast(value: Any, world: World) -> Any:
    """Rank 0's ``value`` on every rank."""
    if not world.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
