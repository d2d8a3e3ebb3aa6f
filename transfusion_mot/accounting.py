"""Parameter and FLOP accounting for summary.json and for comparing MoT with its dense baseline.

Conventions. Parameters of a per-modality expert copy belong to that modality; one shared copy is shared.
The token embedding and the LM head serve the discrete (non-image) modalities; the patch embedding, the
timestep embedder and the image head serve the image modality. Active parameters per token count what
one token of a modality multiplies by, excluding the token-embedding lookup, the timestep embedder and
the adaLN modulation (run once per image, not per token). Training FLOPs per token follow PaLM (arXiv 2204.02311, App. B):
6 * active_params + 12 * n_layers * dim * seq_len, the second term being attention scores and values
over a full context of `seq_len` (no discount for causality).
"""

from __future__ import annotations

from .config import ModelConfig
from .model import Experts, TransfusionMoT


def parameter_accounting(model: TransfusionMoT, seq_len: int | None = None) -> dict:
    cfg: ModelConfig = model.config
    seq_len = seq_len or cfg.max_seq_len
    k = cfg.num_modalities
    image = model.image_modality
    per_modality = [0] * k
    shared = 0
    expert_param_ids: dict[int, int | None] = {}
    for module in model.modules():
        if isinstance(module, Experts):
            for m, copy in enumerate(module):
                for p in copy.parameters():
                    expert_param_ids[id(p)] = m if len(module) > 1 else None

    # adaLN modulation (time_conditioning: adaln) runs once per image, like the timestep embedder
    per_image = [model.time_embed] + [m for m in [b.modulation for b in model.blocks] + [model.final_modulation]
                                      if m is not None]
    image_end = {id(p) for mod in (model.patch_embed, model.image_head, *per_image) for p in mod.parameters()}
    text_end = {id(p) for mod in (model.tok_embed, model.lm_head) for p in mod.parameters()}
    per_token_excluded = {id(p) for mod in (model.tok_embed, *per_image) for p in mod.parameters()}
    active = [0] * k
    for p in model.parameters():
        n = p.numel()
        pid = id(p)
        if pid in expert_param_ids:
            owner = expert_param_ids[pid]
            if owner is None:
                shared += n
                active = [a + n for a in active]
            else:
                per_modality[owner] += n
                active[owner] += n
        elif pid in image_end:
            per_modality[image] += n
            if pid not in per_token_excluded:
                active[image] += n
        elif pid in text_end:
            # shared by all discrete modalities; attributed to "text" in the per-modality table
            per_modality[cfg.modalities.index("text")] += n
            if pid not in per_token_excluded:
                for m in range(k):
                    if m != image:
                        active[m] += n
        else:  # pragma: no cover - every parameter belongs to one of the groups above
            raise AssertionError("unaccounted parameter")
    total = sum(p.numel() for p in model.parameters())
    attention_flops = 12 * cfg.n_layers * cfg.dim * seq_len
    names = cfg.modalities
    return {
        "total_params": total,
        "shared_params": shared,
        "params_per_modality": dict(zip(names, per_modality)),
        "active_params_per_token": dict(zip(names, active)),
        "train_flops_per_token": {n: 6 * a + attention_flops for n, a in zip(names, active)},
        "flops_seq_len": seq_len,
        "untie": sorted(cfg.untie),
    }
