"""The training run's configuration (model, tokenizer, data, vae, optim, train sections) and loading a
trained model back from a run directory.

A training config is one YAML file with those six sections; `model:` may also be the path of a model
config (`model: ../model/tiny.yaml`) or `{base: PATH, key: value...}` to change some of its keys; paths are
resolved relative to the training config's directory, then the working directory. `--set a.b=c` reaches any key. The fully resolved config is written to
RUN/config.yaml, so a run directory alone says how it was made.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from .common.checkpoint import (SHARDED_DIR, load_tensors, read_sharded_weights, read_state, resolve_checkpoint,
                                sharded_keys, verify_checkpoint)
from .common.config import apply_overrides, from_dict, read_yaml_mapping, require_ranges, resolve_config_path, to_dict
from .common.errors import ConfigError, InputNotFound, InvalidInput
from .config import ModelConfig
from .tokenizer import TokenizerConfig

DATA_KINDS = ("latents", "folder", "webdataset")
PRECISIONS = ("fp32", "bf16", "auto")
RUN_TOKENIZER = "tokenizer.json"  # in a run directory: the BPE a run trained on its data (tokenizer.path null)


@dataclass
class DataConfig:
    """Where training samples come from and how they are mixed.

    kind: "latents" (a cache from `tmot vae encode`: fastest), "folder" (image folder + metadata.jsonl) or
    "webdataset" (tar shards; `path` may use braces, e.g. data/{00000..00099}.tar); the last two are
    encoded on the fly by the VAE of the `vae` section.
    """

    kind: str = "latents"
    path: str | None = None
    # built-in data ("shapes" or "emoji") used when `path` is not set: images, a tiny VAE and the latent
    # cache are built under `builtin_dir` on first use and reused afterwards (as `tmot demo` does)
    builtin: str | None = None
    builtin_dir: str = "tmot_data"
    builtin_image_size: int = 32
    builtin_num_images: int = 20000
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


# keys that may change when a run is resumed (they do not change what the run computes per step)
RESUMABLE_KEYS = ("train.max_steps", "train.log_every", "train.save_every", "train.keep_checkpoints",
                  "train.progress", "train.tensorboard", "train.max_bad_steps", "train.compile",
                  "train.activation_checkpointing", "data.path", "data.builtin_dir", "data.text_only_path", "vae.path",
                  "tokenizer.path", "train.eval_every", "train.eval_samples", "train.eval_batch_size",
                  "train.eval_seed", "train.eval_ema", "data.val_path", "data.val_split", "train.peak_tflops",
                  "data.num_workers", "data.prefetch_factor", "data.text_val_path")


def resolve_precision(precision: str, device: torch.device) -> str:
    """"fp32" or "bf16" for train.precision on `device` ("auto": bf16 only where it is native)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
        return "bf16" if caps.get("avx512_bf16") or caps.get("amx_bf16") else "fp32"
    return "fp32"


def absolute_local_paths(config: RunConfig) -> None:
    """Make the files a run config names (data, held-out data, text corpus, VAE, tokenizer) absolute when they
    are on this machine, so the run directory's config.yaml works from any directory. Hub ids, URLs and
    anything not on disk are left as they are."""
    def absolute(value: str | None) -> str | None:
        if not value or "://" in value or value.startswith("pipe:"):
            return value
        path = Path(value).expanduser()
        shard_pattern = "{" in path.name and path.parent.is_dir()
        return str(path.resolve()) if path.exists() or shard_pattern else value

    d = config.data
    d.path, d.val_path, d.text_only_path = absolute(d.path), absolute(d.val_path), absolute(d.text_only_path)
    d.text_val_path = absolute(d.text_val_path)
    config.model.init_from = absolute(config.model.init_from)
    config.vae.path = absolute(config.vae.path)
    config.tokenizer.path = absolute(config.tokenizer.path)


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
    backbone's shape keys (`transfusion_mot.pretrained.resolve_init_from`) and its tokenizer (kind
    pretrained unless the config says otherwise, which RunConfig then refuses)."""
    from .pretrained import resolve_init_from

    model = data.get("model")
    if not isinstance(model, dict) or not model.get("init_from"):
        return data
    tokenizer = dict(data.get("tokenizer") or {})
    tokenizer.setdefault("kind", "pretrained")
    return {**data, "model": resolve_init_from(model), "tokenizer": tokenizer}


def run_config_from_dict(data: dict[str, Any], overrides: list[str] | None = None, base: Path | None = None,
                         where: str = "", resolve_pretrained: bool = True) -> RunConfig:
    """A RunConfig from a mapping (a model file by name or path, `--set` overrides). With model.init_from
    and `resolve_pretrained`, the language model's config fills the shape keys (reading its config.json:
    a run directory's own config.yaml already holds them, so loading a trained run passes False)."""
    data = dict(data)
    model = data.get("model")
    if isinstance(model, str):
        data["model"] = _resolve_model_file(model, base or Path("."))
    elif isinstance(model, dict) and "base" in model:  # a model file plus keys that change it
        rest = {k: v for k, v in model.items() if k != "base"}
        data["model"] = {**_resolve_model_file(str(model["base"]), base or Path(".")), **rest}
    apply_overrides(data, overrides or [])
    try:
        return from_dict(RunConfig, with_pretrained_lm(data) if resolve_pretrained else data)
    except ConfigError as err:
        raise ConfigError(f"{where}{err}") from None


def load_run_config(path: str | Path, overrides: list[str] | None = None, resolve_pretrained: bool = True) -> RunConfig:
    """A training config from YAML (a path, or the name of a shipped config such as `shapes-tiny`) with
    `a.b=c` overrides; unknown keys fail with their path. `resolve_pretrained`: see `run_config_from_dict`."""
    path = resolve_config_path(path, "train")
    return run_config_from_dict(read_yaml_mapping(path), overrides, base=path.parent, where=f"{path}: ",
                                resolve_pretrained=resolve_pretrained)


def run_config_to_dict(config: RunConfig) -> dict[str, Any]:
    return to_dict(config)


def save_run_config(config: RunConfig, path: str | Path) -> None:
    header = "# The fully resolved training config of this run (written by tmot train).\n"
    Path(path).write_text(header + yaml.safe_dump(run_config_to_dict(config), sort_keys=False))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(_flatten(v, key + "."))
        else:
            flat[key] = v
    return flat


def config_differences(a: RunConfig, b: RunConfig, ignore: tuple[str, ...] = ()) -> list[str]:
    """Dotted keys whose values differ, outside `ignore`."""
    fa, fb = _flatten(run_config_to_dict(a)), _flatten(run_config_to_dict(b))
    return sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k) and k not in ignore)


def load_model_weights(checkpoint: str | Path, shapes: dict[str, torch.Size], ema: bool = True
                       ) -> tuple[dict[str, Any], str]:
    """Full weights of a checkpoint directory for inference, in one process: EMA if present and asked for,
    else the raw weights, from a one-process checkpoint's safetensors files or assembled from a sharded
    one's DCP directory (`shapes`: the model's parameter names and shapes). The EMA covers the trained
    parameters only: frozen ones (train.freeze) come from the raw weights, which equal them. Returns
    (state dict, source)."""
    checkpoint = Path(checkpoint)
    sharded = (checkpoint / SHARDED_DIR).is_dir()
    if sharded:
        averaged = sharded_keys(checkpoint, "ema") if ema else set()
        state = read_sharded_weights(checkpoint, {k: v for k, v in shapes.items() if k in averaged}, "ema") if averaged else {}
        source = f"{SHARDED_DIR}/ema" if averaged else f"{SHARDED_DIR}/model"
    else:
        state, source = {}, "model.safetensors"
        if ema and (checkpoint / "ema.safetensors").is_file():
            state, source = load_tensors(checkpoint / "ema.safetensors"), "ema.safetensors"
        elif not (checkpoint / "model.safetensors").is_file():
            raise InputNotFound(f"{checkpoint}: no model.safetensors or {SHARDED_DIR}/ (incomplete or foreign checkpoint)")
    rest = {k: v for k, v in shapes.items() if k not in state}
    if rest:  # no EMA, or an EMA of the trained parameters only
        raw = (read_sharded_weights(checkpoint, rest, "model") if sharded
               else load_tensors(checkpoint / "model.safetensors"))
        state = {**{k: v for k, v in raw.items() if k in rest or k not in shapes}, **state}
        if source.endswith("ema") or source == "ema.safetensors":
            source += " (frozen parameters from the raw weights)"
    return state, source


def load_run_model(run_dir: str | Path, step: int | None = None, ema: bool = True,
                   device: str | torch.device = "cpu") -> tuple[Any, RunConfig, dict[str, Any]]:
    """(model in eval mode, run config, info) from a run directory, in one process, whatever number of
    processes trained it. info: checkpoint path, step and which weights (EMA or raw) were loaded."""
    from .model import TransfusionMoT

    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise InputNotFound(f"{run_dir}: no config.yaml (not a run directory written by `tmot train`)")
    config = load_run_config(config_path, resolve_pretrained=False)
    checkpoint = resolve_checkpoint(run_dir / "checkpoints", step, what=str(run_dir))
    verify_checkpoint(checkpoint)  # a damaged file is named here, not deep inside a reader
    model = TransfusionMoT(config.model)
    state, which = load_model_weights(checkpoint, {k: v.shape for k, v in model.state_dict().items()}, ema=ema)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = [k for k, v in state.items() if k in shapes and tuple(v.shape) != shapes[k]]
    if wrong:
        raise InvalidInput(f"{checkpoint}: {wrong[0]} has shape {tuple(state[wrong[0]].shape)} but the run's model "
                           f"config makes it {shapes[wrong[0]]} (weights of another model?)")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InvalidInput(f"{checkpoint}: weights do not match the run's model config "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.to(device).eval()
    return model, config, {"checkpoint": str(checkpoint), "step": read_state(checkpoint)["step"], "weights": which}


def export_run_text_lm(run_dir: str | Path, out: str | Path, step: int | None = None, ema: bool = True) -> Path:
    """The text side of a run started from a language model (model.init_from), written back as a transformers
    model of that architecture with its tokenizer: `AutoModelForCausalLM.from_pretrained(out)` loads it. With
    the text frozen (train.freeze: [text]) it is the language model exactly as it was."""
    from .pretrained import LM_FILES_DIR, export_text_lm

    run_dir = Path(run_dir)
    model, config, _ = load_run_model(run_dir, step=step, ema=ema)
    if not config.model.init_from:
        raise InvalidInput(f"{run_dir}: --text-lm exports the language model a run started from, and this run "
                           "started from scratch (no model.init_from)")
    lm_files = run_dir / LM_FILES_DIR
    if not (lm_files / "config.json").is_file():
        raise InputNotFound(f"{run_dir}: no {LM_FILES_DIR}/config.json (the language model's config, saved by "
                            "`tmot train`); the run directory is incomplete")
    return export_text_lm({k: v.float() for k, v in model.state_dict().items()}, config.model, lm_files, out)
