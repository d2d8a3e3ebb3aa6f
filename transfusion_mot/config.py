"""The model's configuration: the shape of the MoT backbone, its text and image ends, and the training
objective (loaded strictly from YAML by `transfusion_mot.common.config`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .common.config import load_yaml_config, require_ranges
from .common.errors import ConfigError

UNTIE_CHOICES = ("attn", "ffn", "norm")
NORM_PLACEMENTS = ("pre", "post")
OBJECTIVES = ("ddpm", "flow")
ATTN_BACKENDS = ("auto", "sdpa", "flex")
TIME_CONDITIONINGS = ("add", "adaln")
IMAGE_ATTENTIONS = ("bidirectional", "causal")
EXPERT_INITS = ("auto", "copy", "random")
ROPE_TYPES = ("default", "llama3")
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class ModelConfig:
    """Shape of the MoT backbone and of its text and image ends, plus the training objective.

    `untie` lists which parameter groups get one copy per modality: empty is the dense Transfusion
    baseline, {"attn", "ffn", "norm"} is the full Mixture-of-Transformers of arXiv 2411.04996.
    `norm_placement`: "pre" (Llama/Transfusion/BAGEL: x + f(norm(x)), the default because it is the
    stable choice at every scale we tried) or "post" (the MoT paper's Eq. 2 / Chameleon: x + norm(f(x))).

    `init_from` starts the text side from a Hugging Face causal LM (LMFusion, arXiv 2412.15188; see
    `transfusion_mot.pretrained`): its config then gives every key from `dim` to `tie_embeddings` below, and
    `expert_init` says how the other modalities' experts start: "copy" (copies of the text experts, as
    LMFusion and BAGEL do; also for from-scratch models, so MoT starts as exactly the dense model's
    function), "random" (their own draw) or "auto" (copy with `init_from`, random without).
    """

    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # grouped-query attention: key/value heads (default: n_heads)
    head_dim: int | None = None  # per head (default: dim // n_heads); `head_size` is the value in use
    ffn_dim: int = 688
    vocab_size: int = 261
    # rows of a pretrained LM's vocabulary (init_from); ids from here to vocab_size are this format's own
    # tokens (BOI, EOI), appended as new rows so that no id of the LM moves
    base_vocab_size: int | None = None
    tie_embeddings: bool = False  # the LM head is the token embedding (Qwen2.5-0.5B, Llama-3.2-1B)
    qkv_bias: bool = False  # biases on the Q/K/V projections (Qwen2)
    out_bias: bool = False  # bias on the attention output projection (Llama with attention_bias)
    latent_channels: int = 4
    patch_size: int = 2
    max_seq_len: int = 512
    modalities: list[str] = field(default_factory=lambda: ["text", "image"])
    untie: list[str] = field(default_factory=lambda: ["attn", "ffn", "norm"])
    norm_placement: str = "pre"
    qk_norm: bool = True
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # null, or Llama-3's frequency rule: {rope_type: llama3, factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings}
    rope_scaling: dict[str, Any] | None = None
    init_std: float = 0.02
    init_from: str | None = None  # a transformers causal LM: a local directory or a Hub id
    expert_init: str = "auto"
    attn_backend: str = "auto"
    # "bidirectional": a patch sees every patch of its image (Transfusion); "causal": the paper's ablation
    image_attention: str = "bidirectional"
    # how image tokens learn their diffusion timestep: "add" (Transfusion: an embedding added to every
    # patch at the input) or "adaln" (also DiT's adaLN-Zero: the image experts' norms are scaled and shifted
    # and their residual branches gated by the timestep, in every block)
    time_conditioning: str = "add"
    pos_embed_scale: float = 1.0  # multiplies the fixed 2D sin-cos position embedding of patches
    # objective: "ddpm" (epsilon prediction, cosine schedule) or "flow" (rectified flow, velocity)
    objective: str = "ddpm"
    num_train_timesteps: int = 1000
    image_loss_weight: float = 5.0  # lambda in L = L_LM + lambda * L_diff
    image_first_max_t: int = 500  # image-first (captioning) samples draw t <= this (of num_train_timesteps)
    flow_logit_mean: float = 0.0
    flow_logit_std: float = 1.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise ConfigError(f"model config: {msg}")

        require_ranges(self, "model config", positive=("dim", "n_layers", "n_heads", "ffn_dim", "vocab_size",
                                                       "latent_channels", "patch_size", "max_seq_len",
                                                       "num_train_timesteps"))
        require_ranges(self, "model config", positive=("n_kv_heads", "head_dim", "base_vocab_size"))
        if self.head_dim is None and self.dim % self.n_heads:
            bad(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads}) (or set head_dim)")
        if self.head_size % 2:
            bad(f"head dim ({self.head_size}) must be even for RoPE")
        if self.n_heads % self.kv_heads:
            bad(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.kv_heads})")
        if self.base_vocab_size is not None and not self.base_vocab_size < self.vocab_size:
            bad(f"base_vocab_size ({self.base_vocab_size}) must be below vocab_size ({self.vocab_size}): the rows "
                "after it are the sequence format's own tokens")
        if self.expert_init not in EXPERT_INITS:
            bad(f"expert_init must be one of {list(EXPERT_INITS)}, got {self.expert_init!r}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ROPE_TYPES:
                bad(f"rope_scaling type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
            if kind == "llama3":
                missing = [k for k in LLAMA3_ROPE_KEYS if k not in self.rope_scaling]
                if missing:
                    bad(f"rope_scaling llama3 needs {', '.join(missing)}")
                if not self.rope_scaling["high_freq_factor"] > self.rope_scaling["low_freq_factor"]:
                    bad("rope_scaling llama3: high_freq_factor must exceed low_freq_factor")
        if len(set(self.modalities)) != len(self.modalities):
            bad(f"modalities must be distinct, got {self.modalities}")
        for required in ("text", "image"):
            if required not in self.modalities:
                bad(f"modalities must include {required!r}, got {self.modalities}")
        unknown = sorted(set(self.untie) - set(UNTIE_CHOICES))
        if unknown:
            bad(f"untie: unknown group(s) {unknown}; choose a subset of {list(UNTIE_CHOICES)}")
        if self.norm_placement not in NORM_PLACEMENTS:
            bad(f"norm_placement must be one of {list(NORM_PLACEMENTS)}, got {self.norm_placement!r}")
        if self.objective not in OBJECTIVES:
            bad(f"objective must be one of {list(OBJECTIVES)}, got {self.objective!r}")
        if self.attn_backend not in ATTN_BACKENDS:
            bad(f"attn_backend must be one of {list(ATTN_BACKENDS)}, got {self.attn_backend!r}")
        if self.image_attention not in IMAGE_ATTENTIONS:
            bad(f"image_attention must be one of {list(IMAGE_ATTENTIONS)}, got {self.image_attention!r}")
        if self.time_conditioning not in TIME_CONDITIONINGS:
            bad(f"time_conditioning must be one of {list(TIME_CONDITIONINGS)}, got {self.time_conditioning!r}")
        if self.time_conditioning == "adaln" and self.norm_placement != "pre":
            bad("time_conditioning adaln modulates the pre-norms: it needs norm_placement pre")
        if not (self.pos_embed_scale >= 0 and self.pos_embed_scale < float("inf")):
            bad(f"pos_embed_scale must be a finite number >= 0, got {self.pos_embed_scale}")
        if not 0 <= self.image_first_max_t < self.num_train_timesteps:
            bad(f"image_first_max_t must be in [0, {self.num_train_timesteps}), got {self.image_first_max_t}")

    @property
    def head_size(self) -> int:
        """Width of one attention head: `head_dim`, or dim // n_heads."""
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads: `n_kv_heads`, or n_heads (no grouping)."""
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def copy_experts(self) -> bool:
        """Whether every modality's experts start as copies of the text experts (`expert_init`)."""
        return self.expert_init == "copy" or (self.expert_init == "auto" and self.init_from is not None)

    @property
    def patch_dim(self) -> int:
        return self.latent_channels * self.patch_size**2

    @property
    def num_modalities(self) -> int:
        return len(self.modalities)

    def untied(self, group: str) -> bool:
        return group in self.untie

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ModelConfig":
        return load_yaml_config(cls, path)
