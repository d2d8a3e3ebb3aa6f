"""The state of a MoT training run as parts of the shared checkpointer (`transfusion_mot.common.checkpoint`).

Layout of RUN/checkpoints/step_N/:
    model.safetensors        full (unsharded) fp32 weights of the plain TransfusionMoT
    ema.safetensors          EMA of the weights (what sampling uses by default), when EMA is on
    optimizer.pt             full optimizer state keyed by parameter name (any sharding loads it)
    rank_K.pt                process K's state: every RNG and the data stream's position
    state.json               step, world size, counters; written last, so its presence marks completeness

Under FSDP2 weights, EMA and optimizer state are sharded DTensors: saving gathers them (a collective, so
every process saves), loading keeps each process's own shard of the full tensors.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..common.errors import TrainingError

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FORMAT = "tmot-checkpoint/1"
WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def clean_key(key: str) -> str:
    """State-dict key of the plain model: drop the prefixes activation checkpointing / compile add."""
    for prefix in WRAPPER_PREFIXES:
        key = key.replace(prefix, "")
    return key


def full_tensor(t: Tensor) -> Tensor:
    """Unsharded copy of a (possibly FSDP2 DTensor) tensor; a collective for DTensors."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach()


def full_state_dict(named: dict[str, Tensor]) -> dict[str, Tensor]:
    """{clean name: fp32 CPU tensor}; every rank must call it (DTensor gathers are collectives)."""
    return {clean_key(k): full_tensor(v).float().cpu().contiguous() for k, v in named.items()}


def load_full_into(targets: dict[str, Tensor], full: dict[str, Tensor], what: str) -> None:
    """Copy full tensors into (possibly sharded) tensors: each rank keeps its own shard."""
    names = {clean_key(k): v for k, v in targets.items()}
    missing = sorted(set(names) - set(full))
    if missing:
        raise TrainingError(f"{what}: checkpoint lacks {len(missing)} tensors, e.g. {missing[0]}")
    for name, target in names.items():
        source = full[name]
        with torch.no_grad():
            if hasattr(target, "device_mesh"):  # DTensor: keep the local shard of the full tensor
                from torch.distributed.tensor import distribute_tensor

                shard = distribute_tensor(source.to(target.device, target.dtype), target.device_mesh,
                                          target.placements)
                target.to_local().copy_(shard.to_local())
            else:
                target.copy_(source.to(target.device, target.dtype))


class ModelWeights:
    """The model's parameters, saved whole whatever the sharding (model.safetensors)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Tensor]:
        return full_state_dict(dict(self.model.named_parameters()))

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        load_full_into(dict(self.model.named_parameters()), state, "model weights")


class OptimizerState:
    """AdamW's state keyed by parameter name (torch.distributed.checkpoint's full state dict)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self.model, self.optimizer, state, options=StateDictOptions(full_state_dict=True))


class RunProgress:
    """The run's counters (state.json): steps taken, skipped steps, tokens and training time so far."""

    def __init__(self, world_size: int, vae: str | None, clock: Callable[[], float] = time.time) -> None:
        self.world_size = world_size
        self.vae = vae
        self.clock = clock
        self.step = 0
        self.skipped_steps = 0
        self.bad_in_a_row = 0
        self.tokens_seen = 0
        self.train_time = 0.0  # seconds spent in training steps (no evaluation, no checkpointing)

    def state_dict(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "skipped_steps": self.skipped_steps, "bad_in_a_row": self.bad_in_a_row,
                "tokens_seen": self.tokens_seen, "time": self.clock(), "train_time_s": self.train_time, "vae": self.vae}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["world_size"] != self.world_size:
            raise TrainingError(f"the checkpoint was written by {state['world_size']} processes; resume with the same "
                                f"number (got {self.world_size}) so data order and RNG streams match")
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.bad_in_a_row = int(state.get("bad_in_a_row", 0))
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.train_time = float(state.get("train_time_s", 0.0))


__all__ = ["CHECKPOINT_DIR", "CHECKPOINT_FORMAT", "ModelWeights", "OptimizerState", "RunProgress", "clean_key",
           "full_state_dict", "full_tensor", "load_full_into"]
