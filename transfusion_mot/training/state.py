"""The state of a MoT training run as parts of the shared checkpointer (`transfusion_mot.common.checkpoint`).

Layout of RUN/checkpoints/step_N/ written by ONE process (the format of every earlier version):
    model.safetensors        full fp32 weights of the plain TransfusionMoT
    ema.safetensors          EMA of the weights (what sampling uses by default), when EMA is on
    optimizer.pt             full optimizer state keyed by parameter name
    rank_0.pt                the process's state: every RNG and the data stream's position
    state.json               step, world size, counters; written last, so its presence marks completeness

Written by SEVERAL processes (FSDP2), weights, EMA and optimizer are sharded and no process ever gathers
them: `dcp/` is a torch.distributed.checkpoint directory in which every process writes its own shards
(so the run directory must be on a file system all processes share), next to one rank_K.pt per process.
`tmot export` (`transfusion_mot.run.export_model`) consolidates either format into one safetensors file.

Either format resumes on any number of processes: DCP re-shards on load, full files are split by each
process. With the same number of processes a resume is bit-exact; with another, each process's data
position is re-split from all the saved ones and its random streams are re-seeded (`TrainingState.load`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..common.checkpoint import SHARDED_DIR
from ..common.errors import TrainingError, describe
from ..common.tensors import copy_full_into

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FORMAT = "tmot-checkpoint/1"
RANK_FILE = "rank_{rank}.pt"
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
        if tuple(full[name].shape) != tuple(target.shape):
            raise TrainingError(f"{what}: {name} has shape {tuple(full[name].shape)} in the checkpoint but "
                                f"{tuple(target.shape)} in this model (a checkpoint of another model config?)")
        copy_full_into(target, full[name])


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
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.bad_in_a_row = int(state.get("bad_in_a_row", 0))
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.train_time = float(state.get("train_time_s", 0.0))


class ShardedWeights:
    """Model, EMA and optimizer state as a torch.distributed.checkpoint directory (a checkpointer directory
    part): each process writes and reads only its own shards, and DCP re-shards on load, so a checkpoint
    written by N processes loads on M (one included). Keys are the plain model's parameter names."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, ema: Any = None) -> None:
        self.model, self.optimizer, self.ema = model, optimizer, ema

    def _state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        state: dict[str, Any] = {"model": {clean_key(k): v for k, v in get_model_state_dict(self.model).items()}}
        if self.optimizer is not None:
            state["optimizer"] = get_optimizer_state_dict(self.model, self.optimizer)
        if self.ema is not None:
            state["ema"] = {clean_key(k): v for k, v in self.ema.shadow.items()}
        return state

    def save_to(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(), checkpoint_id=str(path))

    def load_from(self, path: Path) -> None:
        """Load in place (the EMA's shadow tensors are themselves in the state); a damaged directory is a
        TrainingError naming it."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        state = self._state()
        try:
            dcp.load(state, checkpoint_id=str(path))
        except (Exception, CheckpointException) as err:  # missing shards, truncated files, another model
            raise TrainingError(f"damaged checkpoint {path.parent}: cannot read {path.name}/ "
                                f"({describe(err, 300)})") from None
        set_model_state_dict(self.model, state["model"])
        if self.optimizer is not None:
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])


class TrainingState:
    """Model, EMA and optimizer in the format the writer's process count calls for (module docstring), and
    resuming from either format on any number of processes."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, ema: Any, sharded: bool,
                 seed: int = 0) -> None:
        self.model, self.optimizer, self.ema, self.sharded, self.seed = model, optimizer, ema, sharded, seed

    def parts(self, sharded: bool | None = None) -> dict[str, Any]:
        """The checkpointer parts that write (or read) these states."""
        if self.sharded if sharded is None else sharded:
            return {SHARDED_DIR: ShardedWeights(self.model, self.optimizer, self.ema)}
        parts: dict[str, Any] = {"model.safetensors": ModelWeights(self.model)}
        if self.ema is not None:
            parts["ema.safetensors"] = self.ema
        parts["optimizer.pt"] = OptimizerState(self.model, self.optimizer)
        return parts

    def load(self, checkpoint: Path, checkpointer: Any, progress: RunProgress, dist: Any, per_rank: Any,
             verify: bool = True) -> None:
        """Resume. Same number of processes: every part as saved (bit-exact). Another number: weights, EMA,
        optimizer and counters as saved; each process's data position re-split from all the saved ones
        (`load_resplit`: nothing skipped, a few samples seen twice) and its random streams re-seeded.
        `per_rank`: this process's part (a Bundle of `data`: the micro-batches, `noise`, `rng`)."""
        from ..common.checkpoint import read_state

        checkpoint = Path(checkpoint)
        weights = self.parts(sharded=(checkpoint / SHARDED_DIR).is_dir())
        saved_world = int(read_state(checkpoint)["world_size"])
        if saved_world == dist.world_size:
            checkpointer.load(checkpoint, parts={**weights, RANK_FILE: per_rank}, verify=verify)
            return
        checkpointer.load(checkpoint, parts=weights, verify=verify)
        old = [checkpointer.read_part(checkpoint, RANK_FILE.format(rank=k))["data"] for k in range(saved_world)]
        seed = resplit_seed(self.seed, dist.rank, dist.world_size, progress.step)
        per_rank.parts["data"].load_resplit(old, saved_world, seed)
        per_rank.parts["noise"].generator.manual_seed(seed + 1)
        torch.manual_seed(seed + 2)  # the CPU and CUDA generators
        if dist.is_main:
            print(f"note: {checkpoint} was written by {saved_world} processes, resuming on {dist.world_size}: the "
                  "data position is re-split and random streams re-seeded, so this run is not bit-identical to "
                  f"one on {saved_world} processes", flush=True)


def resplit_seed(seed: int, rank: int, world_size: int, step: int) -> int:
    """A seed for process `rank` of `world_size` resuming at `step` after a change of process count."""
    return (int(seed) * 1_000_003 + world_size * 10_007 + rank) * 7_919 + int(step)


__all__ = ["CHECKPOINT_DIR", "CHECKPOINT_FORMAT", "ModelWeights", "OptimizerState", "RANK_FILE", "RunProgress",
           "SHARDED_DIR", "ShardedWeights", "TrainingState", "clean_key", "full_state_dict", "full_tensor",
           "load_full_into", "resplit_seed"]
