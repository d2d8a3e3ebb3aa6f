"""Copying a full tensor into a parameter that may be sharded (an FSDP2 DTensor), without communication."""

from __future__ import annotations

import torch
from torch import Tensor


def local_tensor(t: Tensor) -> Tensor:
    """This process's shard of a DTensor; any other tensor as it is."""
    return t.to_local() if hasattr(t, "device_mesh") else t


@torch.no_grad()
def copy_full_into(target: Tensor, full: Tensor) -> None:
    """target <- full, where target may be a DTensor: each process keeps its own shard of `full` (every
    process must pass the same `full`; it is sliced locally, nothing is sent)."""
    if hasattr(target, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        shard = distribute_tensor(full.to(target.device, target.dtype), target.device_mesh, target.placements,
                                  src_data_rank=None)
        target.to_local().copy_(shard.to_local())
    else:
        target.copy_(full.to(target.device, target.dtype))
