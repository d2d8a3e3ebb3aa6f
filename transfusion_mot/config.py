"""The configuration of a run, one dataclass per section, loaded strictly from YAML
(`transfusion_mot.common.config`: unknown keys and ill-typed values are rejected by key path).

A training config is one YAML file with the sections model, tokenizer, data, vae, optim and train
(`RunConfig`); `model:` may also name a model config (`model: tiny`, a shipped one, or a path such as
`model: ../model/tiny.yaml`) or be `{base: NAME_OR_PATH, key: value...}` to change some of its keys; paths are
resolved relative to the training config's directory, then the working directory. `--set a.b=c` reaches any key. A model started from a pretrained language model
(`model.init_from`) takes its shape from that model's config (`resolve_init_from`). The fully resolved config
is what a run directory keeps, so a run directory alone says how it was made.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .common.config import apply_overrides, from_dict, read_yaml_mapping, require_ranges, resolve_config_path, to_dict
from .common.errors import ConfigError, InputNotFound, InvalidInput, describe
from .common.hub import local_snapshot

UNTIE_CHOICES = ("attn", "ffn", "norm")
NORM_PLACEMENTS = ("pre", "post")
OBJECTIVES = ("ddpm", "flow")
ATTN_BACKENDS = ("auto", "sdpa", "flex")
TIME_CONDITIONINGS = ("add", "adaln")
IMAGE_ATTENTIONS = ("bidirectional", "causal")
IMAGE_OBJECTIVES = ("diffusion", "tokens")
EXPERT_INITS = ("auto", "copy", "random")
ROPE_TYPES = ("default", "llama3")
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


DATA_KINDS = ("auto", "latents", "folder", "webdataset")
BUILTIN_VAES = ("train", "shipped")  # data.builtin_vae
PRECISIONS = ("fp32", "bf16", "auto")
TOKENIZER_KINDS = ("bytes", "hf", "pretrained")
OVERFLOW_CHOICES = ("error", "truncate")
APPENDED_TOKENS = ("boi", "eoi")  # the rows a pretrained LM's vocabulary gains (model.base_vocab_size onwards)


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

    `image_objective` says what an image is: "diffusion" (Transfusion: continuous VAE latents, patchified,
    a diffusion loss, bidirectional attention inside each image) or "tokens" (Chameleon: the code grid of a
    VQ tokenizer, `codebook_size` ids read in raster order with their own embedding and output head, a
    next-token loss and causal attention everywhere). `image_attention` and `image_loss_weight` default to
    each objective's recipe.
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
    latent_channels: int = 4  # diffusion: channels of the VAE latents
    patch_size: int = 2  # diffusion: latent patch side (tokens: every code is one position)
    image_objective: str = "diffusion"
    codebook_size: int | None = None  # tokens: the VQ tokenizer's codebook size (image ids 0..codebook_size-1)
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
    # "bidirectional": a patch sees every patch of its image (Transfusion); "causal": the paper's ablation,
    # and the only choice for tokens (a code must not see the codes it predicts). null: the objective's own
    image_attention: str | None = None
    # how image tokens learn their diffusion timestep: "add" (Transfusion: an embedding added to every
    # patch at the input) or "adaln" (also DiT's adaLN-Zero: the image experts' norms are scaled and shifted
    # and their residual branches gated by the timestep, in every block)
    time_conditioning: str = "add"
    pos_embed_scale: float = 1.0  # multiplies the fixed 2D sin-cos position embedding of patches
    # objective: "ddpm" (epsilon prediction, cosine schedule) or "flow" (rectified flow, velocity)
    objective: str = "ddpm"
    num_train_timesteps: int = 1000
    # lambda in L = L_LM + lambda * L_image; null: 5 for diffusion (Transfusion), 1 for tokens (Chameleon's one
    # next-token loss)
    image_loss_weight: float | None = None
    image_first_max_t: int = 500  # image-first (captioning) samples draw t <= this (of num_train_timesteps)
    flow_logit_mean: float = 0.0
    flow_logit_std: float = 1.0

    def __post_init__(self) -> None:
        if self.image_attention is None:
            self.image_attention = "causal" if self.image_objective == "tokens" else "bidirectional"
        if self.image_loss_weight is None:
            self.image_loss_weight = 1.0 if self.image_objective == "tokens" else 5.0
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
        if self.image_objective not in IMAGE_OBJECTIVES:
            bad(f"image_objective must be one of {list(IMAGE_OBJECTIVES)}, got {self.image_objective!r}")
        if self.image_objective == "tokens":
            if self.codebook_size is None or self.codebook_size < 1:
                bad("image_objective tokens needs codebook_size (the VQ tokenizer's number of codes)")
            if self.image_attention != "causal":
                bad("image_objective tokens needs image_attention: causal (a code must not see the codes it "
                    "predicts)")
            if self.time_conditioning != "add":
                bad("time_conditioning adaln conditions on a diffusion timestep: image_objective tokens has none")
        if not (self.image_loss_weight >= 0 and self.image_loss_weight < float("inf")):
            bad(f"image_loss_weight must be a finite number >= 0, got {self.image_loss_weight}")
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
    def image_tokens(self) -> bool:
        """Images are discrete codes (Chameleon), not diffusion latents (Transfusion)."""
        return self.image_objective == "tokens"

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
        return from_dict(cls, read_yaml_mapping(path))


def check_image_data(model: ModelConfig, latent_shape: tuple[int, ...], codebook_size: int | None, where: str) -> None:
    """ConfigError when the data's images do not fit the model: continuous latents for a tokens model or codes
    for a diffusion model (one line naming both), another codebook, channels, patch size, context."""
    m = model
    shape = tuple(latent_shape)
    if m.image_tokens and codebook_size is None:
        raise ConfigError(f"model.image_objective is tokens (discrete image codes) but {where} holds continuous "
                          f"latents {shape}: encode the images with a VQ tokenizer (`tmot vae encode --vae VQ_DIR`) "
                          "or train with model.image_objective: diffusion")
    if not m.image_tokens and codebook_size is not None:
        raise ConfigError(f"model.image_objective is diffusion (continuous latents) but {where} holds VQ code grids "
                          f"{shape} of a {codebook_size}-code tokenizer: train with model.image_objective: tokens "
                          f"(model.codebook_size: {codebook_size}) or encode the images with an AutoencoderKL")
    if m.image_tokens:
        if codebook_size != m.codebook_size:
            raise ConfigError(f"{where} holds codes of a {codebook_size}-code tokenizer but model.codebook_size is "
                              f"{m.codebook_size}")
        h, w = shape
        tokens, what = h * w, f"code grids {h}x{w}"
    else:
        c, h, w = shape
        if c != m.latent_channels:
            raise ConfigError(f"the data's latents have {c} channels but model.latent_channels is {m.latent_channels}")
        if h % m.patch_size or w % m.patch_size:
            raise ConfigError(f"latents {h}x{w} are not divisible by model.patch_size {m.patch_size}")
        tokens, what = (h // m.patch_size) * (w // m.patch_size), f"latents {h}x{w}"
    if tokens + 4 > m.max_seq_len:  # BOS, BOI, EOI, EOS
        raise ConfigError(f"{what} make {tokens} image tokens{'' if m.image_tokens else f' (patch_size {m.patch_size})'}; with the special tokens "
                          f"that leaves no room for a caption in model.max_seq_len {m.max_seq_len}")


@dataclass
class TokenizerConfig:
    """Which tokenizer to use and what to do with captions longer than `max_text_tokens`.

    kind: "bytes" (no file needed), "hf" (a tokenizer.json at `path`, e.g. from `tmot data tokenizer`; for
    built-in data with `path: null`, a BPE of `model.vocab_size` ids is trained on the training captions) or
    "pretrained" (a transformers tokenizer: the directory or Hub id at `path`, by default `model.init_from`:
    a model started from a language model keeps that model's tokenizer).
    overflow: "error" fails loudly (a silently cut caption changes what the model learns); "truncate"
    keeps the first `max_text_tokens` tokens.
    """

    kind: str = "bytes"
    path: str | None = None
    max_text_tokens: int | None = None
    overflow: str = "error"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.kind not in TOKENIZER_KINDS:
            raise ConfigError(f"tokenizer config: kind must be one of {list(TOKENIZER_KINDS)}, got {self.kind!r}")
        if self.overflow not in OVERFLOW_CHOICES:
            raise ConfigError(f"tokenizer config: overflow must be one of {list(OVERFLOW_CHOICES)}, "
                              f"got {self.overflow!r}")
        if self.max_text_tokens is not None and int(self.max_text_tokens) <= 0:
            raise ConfigError(f"tokenizer config: max_text_tokens must be positive, got {self.max_text_tokens}")


@dataclass
class DataConfig:
    """Where training samples come from and how they are mixed.

    kind: "latents" (a cache from `tmot vae encode`: fastest), "folder" (image folder + metadata.jsonl) or
    "webdataset" (tar shards; `path` may use braces, e.g. data/{00000..00099}.tar); the last two are
    encoded on the fly by the VAE of the `vae` section. "auto": told from what `path` holds (index.json,
    metadata.jsonl or .tar shards) when the run starts; the run directory keeps the kind it found.
    """

    kind: str = "auto"
    path: str | None = None
    # built-in data ("shapes" or "emoji") used when `path` is not set: images, a tiny VAE and the latent
    # cache are built under `builtin_dir` on first use and reused afterwards (as `tmot demo` does)
    builtin: str | None = None
    builtin_dir: str = "tmot_data"
    builtin_image_size: int = 32
    builtin_num_images: int = 20000
    # "train": train the tiny VAE (or VQ tokenizer) for builtin_vae_steps; "shipped": copy the pretrained one
    # that comes with the package (shapes at 32 px, continuous latents)
    builtin_vae: str = "train"
    builtin_vae_steps: int = 1500
    split: str = "train"  # folder: which rows of metadata.jsonl
    image_size: int | None = None  # folder/webdataset: resize to this (default: the VAE's sample_size)
    image_first_ratio: float = 0.2  # captioning direction (Transfusion: 20%)
    caption_dropout: float = 0.1  # caption-first samples whose caption is dropped, for CFG
    text_only_path: str | None = None  # optional text-only stream: .txt (one document per line) or .jsonl
    text_only_ratio: float = 0.0  # fraction of samples drawn from the text-only stream (LM loss only)
    packing: bool = False  # several samples per row up to token_budget (document masks keep them apart)
    token_budget: int | None = None  # default: model.max_seq_len
    shuffle_buffer: int = 1000  # webdataset
    # folder/webdataset: DataLoader worker processes that read and decode images ahead of the training step
    # (0: in the training process); each keeps prefetch_factor samples ready. A webdataset run resumes with
    # the num_workers it was saved with
    num_workers: int = 4
    prefetch_factor: int = 4
    # held-out data for train.eval_every: a latent cache / image folder / shard pattern of the same kind as
    # `path` (default for a folder: `path` itself, rows of split `val_split`)
    val_path: str | None = None
    val_split: str = "val"
    # held-out text documents (.txt / .jsonl, as text_only_path; e.g. `tmot data corpus`): validation adds
    # their mean next-token loss as val_corpus_loss, on the same documents every time
    text_val_path: str | None = None

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise ConfigError(f"data config: {msg}")

        if self.kind not in DATA_KINDS:
            bad(f"kind must be one of {list(DATA_KINDS)}, got {self.kind!r}")
        if self.builtin is not None and self.builtin not in ("shapes", "emoji"):
            bad(f"builtin must be shapes or emoji, got {self.builtin!r}")
        if self.builtin_vae not in BUILTIN_VAES:
            bad(f"builtin_vae must be one of {list(BUILTIN_VAES)}, got {self.builtin_vae!r}")
        for name in ("image_first_ratio", "caption_dropout", "text_only_ratio"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                bad(f"{name} must be in [0, 1], got {value}")
        if self.text_only_ratio > 0 and not self.text_only_path:
            bad("text_only_ratio > 0 needs text_only_path")
        if self.text_only_ratio >= 1.0:
            bad("text_only_ratio must be below 1 (some samples must have images)")
        if self.num_workers < 0 or self.prefetch_factor < 1:
            bad(f"num_workers must be >= 0 and prefetch_factor >= 1, got {self.num_workers}, {self.prefetch_factor}")
        if self.token_budget is not None and self.token_budget < 1:
            bad(f"token_budget must be positive, got {self.token_budget}")

    def __post_init__(self) -> None:
        self.validate()


@dataclass
class VAERef:
    """The autoencoder that made (or will make) the latents: a directory or a hub id.

    Needed to encode folder/webdataset data on the fly and, later, to decode samples. For a latent cache
    it defaults to the VAE recorded in the cache's index.json."""

    path: str | None = None


@dataclass
class OptimConfig:
    """The paper's recipe: AdamW (0.9, 0.95), eps 1e-8, lr 3e-4, 4000 warm-up steps, cosine to 1.5e-5,
    weight decay 0.1, gradient clipping at 1.0. Small configs scale these down."""

    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 4000
    min_lr: float = 1.5e-5
    decay_steps: int | None = None  # length of the cosine; default train.max_steps
    grad_clip: float = 1.0  # 0: no clipping (the norm is still logged)
    ema_decay: float = 0.9999  # 0: no EMA
    # learning-rate multipliers per parameter owner (a modality, or "shared": experts of a group that is not
    # untied), e.g. {text: 0.1}; owners not named train at lr
    lr_mult: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim config: betas must be two numbers in [0, 1), got {self.betas}")
        if self.lr <= 0 or self.min_lr < 0:
            raise ConfigError("optim config: lr must be positive and min_lr non-negative")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"optim config: ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.warmup_steps < 0 or self.grad_clip < 0:
            raise ConfigError("optim config: warmup_steps and grad_clip must be non-negative")
        for owner, mult in self.lr_mult.items():
            if isinstance(mult, bool) or not isinstance(mult, (int, float)) or not 0 < mult < float("inf"):
                raise ConfigError(f"optim config: lr_mult.{owner} must be a positive number, got {mult!r}")


@dataclass
class TrainConfig:
    """The loop. batch_size counts rows per process and per micro-batch (one sample per row, or packed
    rows of data.token_budget tokens); one optimizer step sees batch_size x grad_accum x world_size rows."""

    max_steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    # "bf16": autocast (CPU and CUDA) and bf16 FSDP all-gathers; "auto": bf16 where the hardware computes
    # in bf16 natively (CUDA with bf16 support; CPUs with AVX512-BF16 or AMX), else fp32 (without native
    # bf16 a CPU emulates it, about 2x slower than fp32)
    precision: str = "fp32"
    compile: bool = False  # torch.compile each block
    activation_checkpointing: bool = False
    seed: int = 0
    device: str = "auto"  # auto: cuda when available
    log_every: int = 10
    save_every: int = 500
    keep_checkpoints: int = 3
    max_bad_steps: int = 20  # this many consecutive non-finite losses/gradients stop the run
    progress: bool = True  # tqdm bar on the main process
    tensorboard: bool = True
    # peak dense bf16 TFLOP/s of one device for the logged MFU (default: the known GPUs' table; CPUs: none)
    peak_tflops: float | None = None
    # held-out losses every eval_every steps (0: never) on eval_samples pairs of the data's val split, with
    # timesteps and noise fixed by eval_seed (identical in every evaluation and every run); eval_ema also
    # scores the EMA weights (val_ema_* keys)
    eval_every: int = 0
    eval_samples: int = 256
    eval_batch_size: int = 64
    eval_seed: int = 1234
    eval_ema: bool = False
    # parameter owners that get no updates (no gradient, no weight decay, no optimizer or EMA state): [text]
    # keeps a language model started from (model.init_from) exactly as it was (LMFusion); the rows appended
    # for BOI/EOI still train
    freeze: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        require_ranges(self, "train config", positive=("max_steps", "batch_size", "grad_accum", "log_every",
                                                       "save_every", "max_bad_steps", "eval_samples",
                                                       "eval_batch_size"),
                       non_negative=("eval_every", "keep_checkpoints"))  # 0: no validation / keep every checkpoint
        if self.peak_tflops is not None and not 0 < self.peak_tflops < float("inf"):
            raise ConfigError(f"train config: peak_tflops must be a positive number, got {self.peak_tflops}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"train config: precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"train config: device must be auto, cpu or cuda, got {self.device!r}")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    vae: VAERef = field(default_factory=VAERef)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        owners = [*self.model.modalities, "shared"]
        for what, names in (("train.freeze", self.train.freeze), ("optim.lr_mult", list(self.optim.lr_mult))):
            unknown = [n for n in names if n not in owners]
            if unknown:
                raise ConfigError(f"{what}: unknown parameter owner {unknown[0]!r}; choose from {owners}")
        if set(self.train.freeze) >= set(owners):
            raise ConfigError(f"train.freeze {self.train.freeze} freezes every parameter: nothing would train")
        if self.model.init_from and self.tokenizer.kind != "pretrained":
            raise ConfigError(f"model.init_from {self.model.init_from}: the run keeps the language model's tokenizer, "
                              f"so tokenizer.kind must be 'pretrained' (got {self.tokenizer.kind!r})")
        if self.tokenizer.kind == "pretrained" and not self.model.init_from:
            raise ConfigError("tokenizer kind 'pretrained' belongs to a model started from a language model: set "
                              "model.init_from")
        if self.data.token_budget is not None and self.data.token_budget > self.model.max_seq_len:
            raise ConfigError(f"data.token_budget {self.data.token_budget} exceeds model.max_seq_len "
                              f"{self.model.max_seq_len}")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def to_yaml(self) -> str:
        """The YAML a run directory keeps: every key, resolved."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def differences(self, other: RunConfig, ignore: tuple[str, ...] = ()) -> list[str]:
        """Dotted keys whose values differ from `other`'s, outside `ignore`."""
        a, b = _flatten(self.to_dict()), _flatten(other.to_dict())
        return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in ignore)

    def resolve_paths(self) -> None:
        """The files this config names (data, held-out data, text corpus, VAE, tokenizer, language model) made
        absolute where they are on this machine, so the config works from any directory (hub ids, URLs and
        anything not on disk are left as they are); data.kind "auto" becomes what data.path holds (data that
        is not here yet is told when the run starts)."""
        def absolute(value: str | None) -> str | None:
            if not value or "://" in value or value.startswith("pipe:"):
                return value
            path = Path(value).expanduser()
            shard_pattern = "{" in path.name and path.parent.is_dir()
            return str(path.resolve()) if path.exists() or shard_pattern else value

        d = self.data
        d.path, d.val_path, d.text_only_path = absolute(d.path), absolute(d.val_path), absolute(d.text_only_path)
        d.text_val_path = absolute(d.text_val_path)
        self.model.init_from = absolute(self.model.init_from)
        self.vae.path = absolute(self.vae.path)
        self.tokenizer.path = absolute(self.tokenizer.path)
        if d.kind == "auto" and d.path and (Path(d.path).exists() or ".tar" in d.path):
            from .data.sources import data_kind

            d.kind = data_kind(d.path)


# keys that may change when a run is resumed (they do not change what the run computes per step)
RESUMABLE_KEYS = ("train.max_steps", "train.log_every", "train.save_every", "train.keep_checkpoints",
                  "train.progress", "train.tensorboard", "train.max_bad_steps", "train.compile",
                  "train.activation_checkpointing", "data.path", "data.builtin_dir", "data.text_only_path", "vae.path",
                  "tokenizer.path", "train.eval_every", "train.eval_samples", "train.eval_batch_size",
                  "train.eval_seed", "train.eval_ema", "data.val_path", "data.val_split", "train.peak_tflops",
                  "data.num_workers", "data.prefetch_factor", "data.text_val_path")


def _resolve_model_file(spec: str, base: Path) -> dict[str, Any]:
    """A model config named by a training config: a path relative to that file or to the working directory,
    or the name of a shipped model config (`tiny`, `760m`, ...)."""
    for candidate in (base / spec, Path(spec)):
        if candidate.is_file():
            return read_yaml_mapping(candidate)
    try:
        return read_yaml_mapping(resolve_config_path(spec, "model"))
    except ConfigError as err:
        raise ConfigError(f"model: {err} (looked in {base} and the working directory too)") from None


def with_pretrained_lm(data: dict[str, Any]) -> dict[str, Any]:
    """A run config mapping whose model names `init_from`, completed from the language model's config: the
    backbone's shape keys (`resolve_init_from`) and its tokenizer (kind pretrained unless the config says
    otherwise, which RunConfig then refuses)."""
    model = data.get("model")
    if not isinstance(model, dict) or not model.get("init_from"):
        return data
    tokenizer = dict(data.get("tokenizer") or {})
    tokenizer.setdefault("kind", "pretrained")
    return {**data, "model": resolve_init_from(model), "tokenizer": tokenizer}


def run_config_from_dict(data: dict[str, Any], overrides: list[str] | None = None,
                         settings: Mapping[str, Any] | None = None, base: Path | None = None, where: str = "",
                         resolve_pretrained: bool = True) -> RunConfig:
    """A RunConfig from a mapping (a model file by name or path), `--set` overrides (`a.b=c`, values parsed as
    YAML), then `settings` ({key path: value}, taken as they are: what command-line flags set); its paths
    resolved (`RunConfig.resolve_paths`). With model.init_from and `resolve_pretrained`, the language model's
    config fills the shape keys (reading its config.json: a run directory's own config already holds them, so
    loading a trained run passes False)."""
    data = dict(data)
    model = data.get("model")
    if isinstance(model, str):
        data["model"] = _resolve_model_file(model, base or Path("."))
    elif isinstance(model, dict) and "base" in model:  # a model file plus keys that change it
        rest = {k: v for k, v in model.items() if k != "base"}
        data["model"] = {**_resolve_model_file(str(model["base"]), base or Path(".")), **rest}
    apply_overrides(data, overrides or [])
    apply_overrides(data, settings or {})
    try:
        config = from_dict(RunConfig, with_pretrained_lm(data) if resolve_pretrained else data)
    except ConfigError as err:
        raise ConfigError(f"{where}{err}") from None
    config.resolve_paths()
    return config


def load_run_config(path: str | Path, overrides: list[str] | None = None, settings: Mapping[str, Any] | None = None,
                    resolve_pretrained: bool = True) -> RunConfig:
    """A training config from YAML (a path, or the name of a shipped config such as `shapes-tiny`) with
    overrides and settings (`run_config_from_dict`); unknown keys fail with their path."""
    path = resolve_config_path(path, "train")
    data = read_yaml_mapping(path)
    # the file and its overrides are checked as written first: a setting must not hide a mistake in the file
    config = run_config_from_dict(data, overrides, base=path.parent, where=f"{path}: ",
                                  resolve_pretrained=resolve_pretrained)
    if not settings:
        return config
    return run_config_from_dict(data, overrides, settings, base=path.parent, where=f"{path}: ",
                                resolve_pretrained=resolve_pretrained)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(_flatten(v, key + "."))
        else:
            flat[key] = v
    return flat


# --------------------------------------------------------------------------------------------------
# a pretrained language model's config -> the model config's shape keys

# architecture -> (Q/K/V bias, output-projection bias, per-head QK-norm); None: the config's attention_bias
SUPPORTED: dict[str, tuple[bool | None, bool | None, bool]] = {
    "LlamaForCausalLM": (None, None, False),
    "MistralForCausalLM": (False, False, False),
    "Qwen2ForCausalLM": (True, False, False),
    "Qwen3ForCausalLM": (None, None, True),
}
# the model config keys an LM's config decides (a config with init_from needs none of them)
LM_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "vocab_size", "base_vocab_size",
           "norm_eps", "rope_theta", "rope_scaling", "qkv_bias", "out_bias", "qk_norm", "tie_embeddings",
           "norm_placement")
CONFIG_FILES = ["config.json"]
WEIGHT_FILES = ["*.safetensors", "*.safetensors.index.json", "config.json"]


# --------------------------------------------------------------------------------------------------
# the LM's config -> the backbone's shape


def read_lm_config(source: str | Path) -> Any:
    """The transformers config of a local directory or Hub id (only config.json is downloaded)."""
    from transformers import AutoConfig

    directory = local_snapshot(source, "of a transformers causal LM", allow_patterns=CONFIG_FILES)
    if not (Path(directory) / "config.json").is_file():
        raise InputNotFound(f"model.init_from {source}: no config.json (expected a transformers model directory "
                            "written by save_pretrained, or a Hub id)")
    try:
        return AutoConfig.from_pretrained(str(directory))
    except Exception as err:  # an unknown model_type, a damaged file
        raise InvalidInput(f"model.init_from {source}: cannot read its config.json ({describe(err)})") from None


def _architecture(lm: Any, source: str | Path) -> str:
    archs = list(getattr(lm, "architectures", None) or [])
    arch = next((a for a in archs if a in SUPPORTED), None)
    if arch is None:
        found = archs[0] if archs else getattr(lm, "model_type", "unknown")
        raise ConfigError(f"model.init_from {source}: architecture {found} is not supported (supported: "
                          f"{', '.join(SUPPORTED)})")
    return arch


def _rope(lm: Any, source: str | Path) -> tuple[float, dict[str, Any] | None]:
    """(theta, Llama-3 scaling or None) from either config layout: transformers >= 5 keeps both in
    `rope_parameters`, earlier versions in `rope_theta` and `rope_scaling`."""
    params = dict(getattr(lm, "rope_parameters", None) or {})
    theta = params.get("rope_theta", getattr(lm, "rope_theta", None))
    scaling = params if params else dict(getattr(lm, "rope_scaling", None) or {})
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if theta is None:
        raise ConfigError(f"model.init_from {source}: the config gives no RoPE theta")
    if float(getattr(lm, "partial_rotary_factor", None) or scaling.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConfigError(f"model.init_from {source}: partial rotary embeddings are not supported")
    if kind == "default":
        return float(theta), None
    if kind != "llama3":
        raise ConfigError(f"model.init_from {source}: rope scaling {kind!r} is not supported (supported: default, "
                          "llama3)")
    keep = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return float(theta), {"rope_type": "llama3", **{k: scaling[k] for k in keep if k in scaling}}


def lm_model_keys(lm: Any, source: str | Path, max_seq_len: int) -> dict[str, Any]:
    """The model config keys the LM decides (`LM_KEYS`); ConfigError for what this backbone cannot compute
    exactly (another architecture, activation, sliding windows shorter than the context, MLP biases)."""
    arch = _architecture(lm, source)
    qkv_bias, out_bias, qk_norm = SUPPORTED[arch]
    bias = bool(getattr(lm, "attention_bias", False))
    act = getattr(lm, "hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"model.init_from {source}: activation {act!r} is not supported (SwiGLU with silu only)")
    if getattr(lm, "mlp_bias", False):
        raise ConfigError(f"model.init_from {source}: MLP biases are not supported")
    window = getattr(lm, "sliding_window", None)
    windowed = getattr(lm, "use_sliding_window", arch == "MistralForCausalLM") and window is not None
    if windowed and window < max_seq_len:
        raise ConfigError(f"model.init_from {source}: sliding-window attention ({window} positions) is not supported "
                          f"for a context of {max_seq_len}; set model.max_seq_len <= {window}")
    limit = getattr(lm, "max_position_embeddings", None)
    if limit is not None and max_seq_len > limit:
        raise ConfigError(f"model.max_seq_len {max_seq_len} exceeds the {limit} positions {source} was trained for")
    heads = int(lm.num_attention_heads)
    theta, scaling = _rope(lm, source)
    return {
        "dim": int(lm.hidden_size), "n_layers": int(lm.num_hidden_layers), "n_heads": heads,
        "n_kv_heads": int(getattr(lm, "num_key_value_heads", None) or heads),
        "head_dim": int(getattr(lm, "head_dim", None) or lm.hidden_size // heads),
        "ffn_dim": int(lm.intermediate_size), "vocab_size": int(lm.vocab_size) + len(APPENDED_TOKENS),
        "base_vocab_size": int(lm.vocab_size), "norm_eps": float(lm.rms_norm_eps), "rope_theta": theta,
        "rope_scaling": scaling, "qkv_bias": bias if qkv_bias is None else qkv_bias,
        "out_bias": bias if out_bias is None else out_bias, "qk_norm": qk_norm,
        "tie_embeddings": bool(getattr(lm, "tie_word_embeddings", False)), "norm_placement": "pre",
    }


def resolve_init_from(model: dict[str, Any]) -> dict[str, Any]:
    """A model config mapping with `init_from`, completed with the LM's keys. A key the mapping sets to
    another value than the LM's is a ConfigError naming both."""
    source = model["init_from"]
    max_seq_len = int(model.get("max_seq_len", ModelConfig.max_seq_len))
    derived = lm_model_keys(read_lm_config(source), source, max_seq_len)
    for key, value in derived.items():
        if key in model and model[key] != value:
            raise ConfigError(f"model.{key} is {model[key]!r} but {source} has {value!r}: a config with "
                              "model.init_from needs no shape keys (remove it, or start from another model file)")
    return {**model, **derived}
