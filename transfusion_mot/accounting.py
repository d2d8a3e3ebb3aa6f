"""Parameter and FLOP accounting for summary.json and for comparing MoT with its dense baseline.

Conventions. Parameters of a per-modality expert copy belong to that modality; one shared copy is shared.
The token embedding and the LM head serve the discrete (non-image) modalities; the patch (or code) embedding, the
timestep embedder and the image head serve the image modality. Active parameters per token count what
one token of a modality multiplies by, excluding the token-embedding lookup, the timestep embedder and
the adaLN modulation (run once per image, not per token). Training FLOPs per token follow PaLM (arXiv 2204.02311, App. B):
6 * active_params + 12 * n_layers * dim * seq_len, the second term being attention scores and values
over a full context of `seq_len` (no discount for causality). `batch_train_flops` counts a real batch the
same way, with each token's context the length of its own document (padding and the other documents
packed into its row do not count), which is what MFU is measured against.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import ModelConfig
from .model import Experts, TransfusionMoT, parameters_of


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
    per_image = [m for m in [model.time_embed, *(b.modulation for b in model.blocks), model.final_modulation]
                 if m is not None]
    image_tables = [m for m in (model.patch_embed, model.image_head, model.code_embed, model.code_head) if m is not None]
    image_end = {id(p) for mod in (*image_tables, *per_image) for p in mod.parameters()}
    embeddings = [m for m in (model.tok_embed, model.new_tok_embed) if m is not None]
    text_end = {id(p) for mod in (*embeddings, model.lm_head, model.new_lm_head) if mod is not None
                for p in mod.parameters()}
    lookups = [*embeddings, *([model.code_embed] if model.code_embed is not None else [])]
    per_token_excluded = {id(p) for mod in (*lookups, *per_image) for p in mod.parameters()}
    active = [0] * k
    if cfg.tie_embeddings:  # the LM head is the embedding table: a lookup, then a matmul by the same weights
        head = sum(m.weight.numel() for m in embeddings)
        active = [a if m == image else a + head for m, a in enumerate(active)]
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
        "attention_flops_per_token_pair": 12 * cfg.n_layers * cfg.dim,
        "untie": sorted(cfg.untie),
    }


def batch_train_flops(accounting: dict, modality: Tensor, doc_ids: Tensor, modalities: list[str]) -> float:
    """Training FLOPs (forward + backward) of one batch: 6 x active parameters per real token of each
    modality, plus 12 x n_layers x dim per (query, key) pair within each document. modality, doc_ids:
    (B, L) long, doc_id -1 for padding."""
    valid = doc_ids >= 0
    per_modality = torch.bincount(modality[valid], minlength=len(modalities)).tolist()
    active = accounting["active_params_per_token"]
    flops = sum(6.0 * active[name] * n for name, n in zip(modalities, per_modality))
    batch, length = doc_ids.shape
    document = (doc_ids + torch.arange(batch).unsqueeze(1) * (length + 1))[valid]  # unique per (row, doc)
    lengths = torch.bincount(document).double()
    return flops + accounting["attention_flops_per_token_pair"] * float(lengths.pow(2).sum())


GIB = 2**30


def training_memory(model: TransfusionMoT, ema: bool = True, world_size: int = 1) -> dict:
    """Bytes of training state per process: fp32 weights (all), and for the trainable parameters only
    (requires_grad: `train.freeze` leaves the rest out) fp32 gradients, AdamW's two moments and the EMA;
    FSDP2 shards each of them over `world_size` processes. Activations, bf16 all-gather buffers and the
    CUDA context are not counted: they depend on batch, context and activation checkpointing."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    parts = {"weights": 4 * total, "gradients": 4 * trainable, "adamw": 8 * trainable,
             "ema": 4 * trainable if ema else 0}
    return {"trainable_params": trainable, "frozen_params": total - trainable, "world_size": world_size,
            "per_process_gib": {k: round(v / world_size / GIB, 3) for k, v in parts.items()},
            "total_per_process_gib": round(sum(parts.values()) / world_size / GIB, 3),
            "excludes": "activations, bf16 all-gather buffers, the CUDA context"}


def describe_config(spec: str, overrides: list[str] | None = None, seq_len: int | None = None,
                    world_size: int = 1) -> dict:
    """`tmot info`: parameter and FLOP accounting of a model config or a training config (a path or a shipped
    name, model configs first), built on the meta device (no memory for the weights; a model with `init_from`
    reads only the language model's config.json). A training config adds its training memory, with its
    `train.freeze` and EMA."""
    import torch

    from .common.config import apply_overrides, from_dict, read_yaml_mapping, resolve_config_path, shipped_config_names
    from .common.errors import ConfigError
    from .config import ModelConfig, load_run_config, resolve_init_from

    try:
        path, training = resolve_config_path(spec, "model"), False
    except ConfigError as err:
        if str(spec) not in shipped_config_names("train"):
            raise ConfigError(f"{err}; or a shipped training config: {', '.join(shipped_config_names('train'))}") from None
        path, training = resolve_config_path(spec, "train"), True
    if not training and "model" in read_yaml_mapping(path):
        training = True  # a training config given by its path
    run = None
    if training:
        run = load_run_config(path, overrides)
        config = run.model
    else:
        data = read_yaml_mapping(path)
        apply_overrides(data, overrides or [])
        config = from_dict(ModelConfig, resolve_init_from(data) if data.get("init_from") else data)
    with torch.device("meta"):
        model = TransfusionMoT(config)
    report = parameter_accounting(model, seq_len=seq_len)
    if run is not None:
        for name in parameters_of(model, run.train.freeze):
            model.get_parameter(name).requires_grad_(False)
        report["training_memory"] = training_memory(model, ema=run.optim.ema_decay > 0, world_size=world_size)
        report["training_memory"]["freeze"] = run.train.freeze
    if config.init_from:
        report["init_from"] = config.init_from
    return report
