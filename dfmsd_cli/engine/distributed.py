"""``torchrun`` / DDP helpers: gloo on CPU, nccl on CUDA; rank 0 alone writes files.

The one place that reads torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``):
commands ask :func:`is_main_process`, loops get a :class:`DistInfo` from ``init_distributed``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launch_info() -> DistInfo:
    """This process's rank, world size and local rank as torchrun set them (single: 0, 1, 0)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    return DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def is_main_process() -> bool:
    """True on rank 0 (or without torchrun): the process that prints and writes."""
    return launch_info().is_main


def init_distributed(device: torch.device) -> DistInfo:
    """Initialise the process group when launched by ``torchrun`` (WORLD_SIZE > 1)."""
    info = launch_info()
    if not info.enabled:
        return info
    world, rank, local_rank = info.world_size, info.rank, info.local_rank
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local_rank)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_mean(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Average scalar logs over ranks (for printing; gradients are averaged by DDP)."""
    if not info.enabled or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / info.world_size for k, v in zip(keys, t.tolist(), strict=True)}


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
