"""Optimiser pieces of the paper's recipe: AdamW with decay only on matrices, and an EMA of the weights.
(The warm-up + cosine schedule is shared by every training loop: `transfusion_mot.common.schedule`.)"""

from __future__ import annotations

import torch
from torch import nn

from ..common.tensors import local_tensor
from .state import full_state_dict, load_full_into


def freeze_parameters(model: nn.Module, owners: list[str]) -> list[str]:
    """requires_grad False on every parameter whose owner (`model.parameter_owners()`) is in `owners`, but
    the rows appended to a pretrained vocabulary (BOI, EOI: new to the LM, they always train). Called on the
    plain model before FSDP2 wraps it (the sharded parameters inherit the flag). Returns the frozen names."""
    params = dict(model.named_parameters())
    frozen = model.parameters_of(owners)
    for name in frozen:
        params[name].requires_grad_(False)
    return frozen


def param_groups(model: nn.Module, weight_decay: float, lr_mult: dict[str, float] | None = None) -> list[dict]:
    """AdamW groups of the trainable parameters: decay on matrices (projections, embeddings), never on norms
    or biases (1-D tensors); with `lr_mult`, one pair of groups per parameter owner (a modality, or
    "shared"), each with its "lr_mult" (the trainer multiplies the scheduled lr by it). Frozen parameters
    (requires_grad False) are in no group, so the optimizer keeps no state for them."""
    owners = model.parameter_owners() if lr_mult else {}
    groups: dict[tuple[str, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((owners.get(name, ""), p.dim() >= 2), []).append(p)
    lr_mult = lr_mult or {}
    return [{"params": params, "weight_decay": weight_decay if decay else 0.0, "lr_mult": lr_mult.get(owner, 1.0),
             **({"owner": owner} if owner else {})}
            for (owner, decay), params in sorted(groups.items(), key=lambda kv: (kv[0][0], not kv[0][1]))]


class EMA:
    """Exponential moving average of the weights, kept in fp32 next to them (sharded like them under FSDP2).

    Only trainable parameters are averaged (a frozen one is its own average). Its state (a checkpoint's
    ema.safetensors) is the full, unsharded average keyed by parameter name."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad}
        self._pairs: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """shadow <- lerp(shadow, weights, 1 - decay): one fused foreach op over this process's local shards.
        (On DTensors the same op costs a Python-level dispatch per tensor, ~400 per step for a 24-layer MoT.)
        The local views are taken once: parameters and shadows are updated in place, never replaced."""
        if self._pairs is None:
            params = dict(model.named_parameters())
            names = list(self.shadow)
            self._pairs = ([local_tensor(self.shadow[n]) for n in names],
                           [local_tensor(params[n].detach()) for n in names])
        shadows, weights = self._pairs
        if any(w.dtype != torch.float32 for w in weights):  # never in training (weights stay fp32)
            weights = [w.float() for w in weights]
        torch._foreach_lerp_(shadows, weights, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return full_state_dict(self.shadow)  # a collective under FSDP2: every process calls it

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_full_into(self.shadow, state, "EMA weights")

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            if name in self.shadow:
                p.copy_(self.shadow[name].to(p.dtype))
