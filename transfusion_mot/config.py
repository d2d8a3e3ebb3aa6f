"""The model's configuration: the shape of the MoT backbone, its text and image ends, and the training
objective (loaded strictly from YAML by `transfusion_mot.common.config`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .common.config import load_yaml_config, require_ranges
from .common.errors import ConfigError

UNTIE_CHOICES = ("attn", "ffn", "norm")
NORM_PLACEMENTS = ("pre", "post")
OBJECTIVES = ("ddpm", "flow")
ATTN_BACKENDS = ("auto", "sdpa", "flex")
TIME_CONDITIONINGS = ("add", "adaln")
IMAGE_ATTENTIONS = ("bidirectional", "causal")


@dataclass
class ModelConfig:
    """Shape of the MoT backbone and of its text and image ends, plus the training objective.

    `untie` lists which parameter groups get one copy per modality: empty is the dense Transfusion
    baseline, {"attn", "ffn", "norm"} is the full Mixture-of-Transformers of arXiv 2411.04996.
    `norm_placement`: "pre" (Llama/Transfusion/BAGEL: x + f(norm(x)), the default because it is the
    stable choice at every scale we tried) or "post" (the MoT paper's Eq. 2 / Chameleon: x + norm(f(x))).
    """

    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    ffn_dim: int = 688
    vocab_size: int = 261
    latent_channels: int = 4
    patch_size: int = 2
    max_seq_len: int = 512
    modalities: list[str] = field(default_factory=lambda: ["text", "image"])
    untie: list[str] = field(default_factory=lambda: ["attn", "ffn", "norm"])
    norm_placement: str = "pre"
    qk_norm: bool = True
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.02
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
        if self.dim % self.n_heads:
            bad(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if (self.dim // self.n_heads) % 2:
            bad(f"head dim ({self.dim // self.n_heads}) must be even for RoPE")
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
    def head_dim(self) -> int:
        return self.dim // self.n_heads

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
