"""Tensors that may be sharded (FSDP2 DTensors): a local shard, a full copy, a full tensor copied into a shard
without communication, and state dicts of full tensors keyed by the plain module's names."""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import TrainingError


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


# the prefixes activation checkpointing, torch.compile and FSDP wrappers add to state-dict keys
WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def clean_key(key: str) -> str:
    """State-dict key of the plain module: the prefixes wrappers add dropped."""
    for prefix in WRAPPER_PREFIXES:
        key = key.replace(prefix, "")
    return key


def full_tensor(t: Tensor) -> Tensor:
    """Unsharded copy of a (possibly FSDP2 DTensor) tensor; a collective for DTensors."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach()


def full_state_dict(named: dict[str, Tensor]) -> dict[str, Tensor]:
    """{clean name: fp32 CPU tensor}; every process must call it (DTensor gathers are collectives)."""
    return {clean_key(k): full_tensor(v).float().cpu().contiguous() for k, v in named.items()}


def load_full_into(targets: dict[str, Tensor], full: dict[str, Tensor], what: str) -> None:
    """Copy full tensors into (possibly sharded) tensors, by clean name: each process keeps its own shard. A
    missing tensor or one of another shape is a TrainingError naming it (a checkpoint of another model)."""
    names = {clean_key(k): v for k, v in targets.items()}
    missing, extra = sorted(set(names) - set(full)), sorted(set(full) - set(names))
    if missing:
        raise TrainingError(f"{what}: checkpoint lacks {len(missing)} tensors, e.g. {missing[0]}")
    if extra:
        raise TrainingError(f"{what}: checkpoint holds {len(extra)} tensors this model does not have, e.g. {extra[0]} "
                            "(a checkpoint of another config?)")
    for name, target in names.items():
        if tuple(full[name].shape) != tuple(target.shape):
            raise TrainingError(f"{what}: {name} has shape {tuple(full[name].shape)} in the checkpoint but "
                             f"{tuple(target.shape)} here (a checkpoint of another config?)")
        copy_full_into(target, full[name])
