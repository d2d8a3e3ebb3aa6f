"""This process's place in a torchrun process group, and the collectives every part of a run shares.

NCCL serves only CUDA tensors and gloo only CPU ones, so every collective goes through `all_reduce_sum` /
`barrier` / `any_rank`, which put their tensors on `DistInfo.device`. One process (no torchrun) is a
`DistInfo()` for which every collective is a no-op."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    """Rank, world size and local rank of this process, and the device its collectives run on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes in the environment (single process: nothing to do).

    `device` is train.device: NCCL when it can be CUDA and CUDA is there, else gloo; multi-node rendezvous is
    torchrun's (--nnodes, --rdzv-endpoint)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        cuda = device != "cpu" and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    collectives = torch.device("cuda", local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=collectives)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum over processes; the reduction runs on the collective device, the result comes back where
    `values` were."""
    if not info.distributed:
        return values
    buffer = values.to(info.device)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    return buffer.to(values.device)


def barrier(info: DistInfo) -> None:
    if info.distributed:
        if info.device.type == "cuda":  # NCCL's barrier must know this process's GPU
            dist.barrier(device_ids=[info.device.index])
        else:
            dist.barrier()


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every process when `flag` is true on any (one all-reduce)."""
    return all_reduce_sum(torch.tensor([float(flag)]), info).item() > 0


__all__ = ["DistInfo", "all_reduce_sum", "any_rank", "barrier", "init_distributed", "shutdown_distributed"]
