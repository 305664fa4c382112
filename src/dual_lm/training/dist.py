"""Process-group plumbing for ``torchrun``: who am I, which device, and summing statistics across ranks.

The environment variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK) are read here, at the
entry of a run, and nowhere else.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistInfo:
    """Join the torchrun process group (gloo on CPU, NCCL on GPU) or run as a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if cuda else "gloo")
    rank = tdist.get_rank() if world > 1 else 0
    return DistInfo(rank, world, local, device)


def sum_across_ranks(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Element-wise sum of a dict of numbers over all ranks (identity in a single process)."""
    if not info.distributed or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=info.device)
    tdist.all_reduce(tensor)
    return dict(zip(keys, tensor.tolist(), strict=True))


def all_keys(keys: set[str], info: DistInfo) -> set[str]:
    """Union of string keys over ranks (ranks may see different objectives)."""
    if not info.distributed:
        return keys
    gathered: list = [None] * info.world_size
    tdist.all_gather_object(gathered, sorted(keys))
    return set().union(*map(set, gathered))


def barrier(info: DistInfo) -> None:
    if info.distributed:
        tdist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.distributed and tdist.is_initialized():
        tdist.destroy_process_group()
