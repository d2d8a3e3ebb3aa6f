"""The model a run trains, with parallelism and memory/speed options applied from OUTSIDE it (torchtitan
style), so `TransfusionMoT` stays a plain nn.Module: activation checkpointing, torch.compile, FSDP2.

Order matters: activation checkpointing wraps each block, compile compiles each (wrapped) block
(`common.compile.compile_blocks`, which sampling uses too), and FSDP2's `fully_shard` goes on each block and
then on the root.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from ..accounting import parameter_accounting
from ..common.compile import compile_blocks
from ..common.distributed import DistInfo
from ..config import RunConfig
from ..diffusion import make_objective
from ..losses import TransfusionStep
from ..model import TransfusionMoT, freeze_parameters


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in backward: memory O(layers) -> O(1) blocks, ~30% more compute."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, block in enumerate(model.blocks):
        model.blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False)


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


def build_model(config: RunConfig, dist: DistInfo, device: torch.device, precision: str
                ) -> tuple[TransfusionMoT, TransfusionStep, dict[str, Any]]:
    """(the model of config.model, the loss module around it, its parameter and FLOP accounting), with
    train.freeze, activation checkpointing, compile and FSDP2 applied from outside, in that order. Several
    processes build on the meta device (no process ever holds the full model), shard, then draw each tensor
    whole from the same seed and keep their shard. Draws from the global RNG: seed it first."""
    tc = config.train
    if dist.distributed:
        with torch.device("meta"):
            model = TransfusionMoT(config.model)
    else:
        model = TransfusionMoT(config.model).to(device)
    frozen = freeze_parameters(model, tc.freeze)  # before FSDP2: the sharded parameters inherit the flags
    accounting = parameter_accounting(model, seq_len=config.data.token_budget or config.model.max_seq_len)
    step_module = TransfusionStep(model, make_objective(config.model))
    if tc.activation_checkpointing:
        apply_activation_checkpointing(model)
    if tc.compile:
        compile_blocks(model)
    if dist.distributed:
        apply_fsdp(step_module, model.blocks, bf16=precision == "bf16")
        model.to_empty(device=device)
        torch.manual_seed(tc.seed)
        model.reset_parameters()  # each process draws every tensor whole and keeps its own shard
    shared = sorted({"attn", "ffn", "norm"} - set(config.model.untie))
    if frozen and shared and dist.is_main:  # their experts serve every modality, so they still train
        print(f"note: train.freeze {tc.freeze} freezes {len(frozen)} tensors, but the {', '.join(shared)} weights "
              f"are shared by every modality (model.untie lacks them) and still train: the frozen modality's "
              f"outputs will change; untie them to keep it exactly as it was", file=sys.stderr)
    return model, step_module, accounting
