"""Parallelism and memory/speed options applied from OUTSIDE the model (torchtitan style), so
`TransfusionMoT` stays a plain nn.Module: activation checkpointing, torch.compile, FSDP2.

Order matters: activation checkpointing wraps each block, compile compiles each (wrapped) block, and
FSDP2's `fully_shard` goes on each block and then on the root.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    """This process's place in the process group, and the device its collectives run on: NCCL serves only
    CUDA tensors and gloo CPU ones, so every collective goes through `all_reduce_sum` / `barrier`, which
    put their tensors on `device`."""

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


def init_distributed(device_kind: str) -> DistInfo:
    """Join the process group torchrun describes in the environment (single process: nothing to do).

    gloo on CPU, NCCL on CUDA; multi-node rendezvous is torchrun's (--nnodes, --rdzv-endpoint)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        if device_kind == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    device = torch.device("cuda", local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in backward: memory O(layers) -> O(1) blocks, ~30% more compute."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, block in enumerate(model.blocks):
        model.blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_compile(model: nn.Module) -> None:
    """Compile each block separately: the blocks are identical, so one graph is reused and compile is fast.

    Routing sizes change with every batch (modality counts), so dynamic shapes are on."""
    for block in model.blocks:
        block.compile(dynamic=True)


def apply_fsdp(root: nn.Module, blocks: nn.ModuleList, bf16: bool, reshard_after_forward: bool = True) -> None:
    """FSDP2: shard every block, then `root` (embeddings, heads, final norm and whatever else it holds).

    `root` is the module whose forward computes the loss, so the heads run inside an FSDP forward. Its
    inputs are not cast (noise and targets stay fp32); blocks get bf16 params with fp32 gradient reduction."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if bf16:
        block_mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        root_mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                       cast_forward_inputs=False)
    else:
        block_mp = root_mp = MixedPrecisionPolicy()
    for block in blocks:
        fully_shard(block, mp_policy=block_mp, reshard_after_forward=reshard_after_forward)
    fully_shard(root, mp_policy=root_mp, reshard_after_forward=reshard_after_forward)


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
