"""`tmot train`: compose a training run from its config, then hand the built parts to the loop.

In order: join the process group (torchrun), build the built-in data set the config names (main process;
the others wait), check the run directory (a new run, or `--resume` with only run-control keys changed),
then the model, the loss module with activation checkpointing / compile / FSDP2 applied from outside, the
optimizer and EMA, this process's sample stream and held-out set, and the noise generator. The loop
(`transfusion_mot.training.trainer`) runs; summary.json records the run.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..accounting import parameter_accounting
from ..batch import Collator
from ..common.device import resolve_device
from ..common.errors import ConfigError, InputNotFound, TrainingError
from ..diffusion import make_objective
from ..model import TransfusionMoT
from ..pretrained import LM_FILES_DIR, check_matches_lm, check_tokenizer_matches_lm, load_lm_weights, save_lm_files
from ..run import (RESUMABLE_KEYS, RUN_TOKENIZER, RunConfig, absolute_local_paths, config_differences,
                   load_run_config, resolve_precision, save_run_config)
from ..tokenizer import load_tokenizer
from ..training.metrics import validation_summary, write_summary
from ..training.optim import EMA, freeze_parameters, param_groups
from ..training.parallel import (
    DistInfo,
    apply_activation_checkpointing,
    apply_compile,
    apply_fsdp,
    barrier,
    init_distributed,
    shutdown_distributed,
)
from ..training.state import CHECKPOINT_DIR
from ..training.stream import build_batches, build_stream
from ..training.trainer import Trainer, TrainResult, TransfusionStep
from ..training.validation import (ValidationSet, load_validation_documents, load_validation_pairs,
                                   missing_held_out)


def prepare_run_dir(config: RunConfig, run_dir: Path, resume: bool, dist: DistInfo) -> Path | None:
    """Write RUN/config.yaml; the checkpoint to resume from (None for a new run). A new run refuses a
    directory that holds checkpoints; a resumed one refuses changes to anything but run-control keys."""
    from ..common.checkpoint import latest_checkpoint, latest_intact_checkpoint

    existing = latest_checkpoint(run_dir / CHECKPOINT_DIR)
    saved_config = run_dir / "config.yaml"
    if resume:
        if existing is None:
            raise InputNotFound(f"--resume: no checkpoint in {run_dir}/{CHECKPOINT_DIR} to resume from")
        # a damaged newest checkpoint (cut short by a full disk, say) is named and passed over
        existing = latest_intact_checkpoint(run_dir / CHECKPOINT_DIR,
                                            report=lambda m: print(m, file=sys.stderr) if dist.is_main else None)
        if existing is None:
            raise TrainingError(f"--resume: every checkpoint in {run_dir}/{CHECKPOINT_DIR} is damaged (see above)")
        if saved_config.is_file():
            diff = config_differences(load_run_config(saved_config, resolve_pretrained=False), config,
                                      ignore=RESUMABLE_KEYS)
            if diff:
                raise ConfigError(f"--resume: the config differs from the run's config.yaml in {diff}; only "
                                  f"{', '.join(RESUMABLE_KEYS)} may change when resuming")
    elif existing is not None:
        raise ConfigError(f"{run_dir} already holds checkpoints: pass --resume to continue it, or choose a new --out")
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_run_config(config, saved_config)
    barrier(dist)
    return existing if resume else None


def prepare_builtin_data(config: RunConfig, dist: DistInfo) -> None:
    """Build (main process) or wait for the built-in data set, then point data/vae/tokenizer at it."""
    from .prepare import prepare_for_run

    if dist.is_main:
        prepare_for_run(config, progress=config.train.progress)
    barrier(dist)
    if not dist.is_main:
        prepare_for_run(config, build=False)


def prepare_data_tokenizer(config: RunConfig, run_dir: Path, resume: bool, dist: DistInfo) -> None:
    """A tokenizer of kind `hf` with no file, on data that brings none: RUN/tokenizer.json, a BPE of the
    training captions (trained once, by the main process; a resumed run keeps its own)."""
    from ..common.checkpoint import latest_checkpoint
    from .prepare import train_data_tokenizer

    path = (run_dir / RUN_TOKENIZER).resolve()
    if dist.is_main and not path.is_file():
        if not resume and latest_checkpoint(run_dir / CHECKPOINT_DIR) is not None:
            return  # another run's directory: prepare_run_dir refuses it, and nothing of it is touched
        print(f"[tokenizer] training a BPE of up to {config.model.vocab_size} ids on the training captions of "
              f"{config.data.path} -> {path}", file=sys.stderr)
        train_data_tokenizer(config, path)
    barrier(dist)
    config.tokenizer.path = str(path)


def build_validation(config: RunConfig, tokenizer: Any, collator: Collator, objective: Any, latent_shape: tuple,
                     vae_model: Any, device: torch.device) -> tuple[ValidationSet, str]:
    """The held-out set with its fixed draws; every rank scores all of it (identical forwards, as FSDP
    needs), so no reduction is needed."""
    size = config.data.image_size or (int(vae_model.config.sample_size) if vae_model is not None else None)
    pairs, source = load_validation_pairs(config.data, config.train.eval_samples, vae=vae_model, device=device,
                                          image_size=size)
    shapes = {tuple(latent.shape) for latent, _ in pairs}
    if shapes != {tuple(latent_shape)}:
        raise ConfigError(f"validation data {source}: latents of shape {sorted(shapes)}, but the training data's are "
                          f"{tuple(latent_shape)}; use held-out data encoded by the same VAE")
    documents = (load_validation_documents(config.data.text_val_path, config.train.eval_samples, tokenizer,
                                           config.model.max_seq_len - 2) if config.data.text_val_path else [])
    valset = ValidationSet(pairs, tokenizer, collator, objective, seed=config.train.eval_seed,
                           batch_size=config.train.eval_batch_size, max_text_tokens=config.tokenizer.max_text_tokens,
                           overflow=config.tokenizer.overflow, device=device, documents=documents)
    if documents:
        source += f"; text documents {config.data.text_val_path} ({len(documents)})"
    return valset, source


def warn_about_shared_weights(config: RunConfig, frozen: list[str]) -> None:
    """train.freeze leaves the experts of groups that are not untied trainable (they serve every modality): say
    so, since then the frozen modality's outputs still change."""
    shared = sorted({"attn", "ffn", "norm"} - set(config.model.untie))
    if shared:
        print(f"note: train.freeze {config.train.freeze} freezes {len(frozen)} tensors, but the {', '.join(shared)} "
              f"weights are shared by every modality (model.untie lacks them) and still train: the frozen "
              f"modality's outputs will change; untie them to keep it exactly as it was", file=sys.stderr)


@dataclass
class ComposedRun:
    """A training run ready to go: the trainer on its built parts, and what summary.json reports about them."""

    trainer: Trainer
    accounting: dict[str, Any]
    latent_shape: tuple[int, ...]
    resumed_from: Path | None
    validation_source: str | None


def build_run(config: RunConfig, run_dir: str | Path, resume: bool = False, dist: DistInfo | None = None) -> ComposedRun:
    """Every part of a run, in the order that fixes its random draws (so a run resumes bit for bit)."""
    run_dir = Path(run_dir)
    dist = dist or DistInfo()
    tc, oc = config.train, config.optim
    device = resolve_device(tc.device, dist.local_rank)
    precision = resolve_precision(tc.precision, device)
    trains_tokenizer = config.tokenizer.kind == "hf" and not config.tokenizer.path  # a BPE of the data's captions
    if config.data.path is None and config.data.builtin:
        prepare_builtin_data(config, dist)
    absolute_local_paths(config)  # the run directory then works from any directory
    lm_source = config.model.init_from
    if lm_source:
        check_matches_lm(config.model)
        lm_files = run_dir / LM_FILES_DIR
        if resume and (lm_files / "config.json").is_file():  # the run's own copy of the LM's config and tokenizer
            config.tokenizer.path = str(lm_files.resolve())
    if config.tokenizer.kind == "hf" and not config.tokenizer.path:
        prepare_data_tokenizer(config, run_dir, resume, dist)
    tokenizer = load_tokenizer(config.tokenizer, config.model)
    if trains_tokenizer and tokenizer.vocab_size < config.model.vocab_size:  # few captions: fewer merges
        if dist.is_main:
            print(f"note: the training captions give a BPE of {tokenizer.vocab_size} ids, not model.vocab_size "
                  f"{config.model.vocab_size}: the model is sized to it", file=sys.stderr)
        config.model.vocab_size = tokenizer.vocab_size
    if tokenizer.vocab_size != config.model.vocab_size:
        raise ConfigError(f"model.vocab_size is {config.model.vocab_size} but the tokenizer has {tokenizer.vocab_size} "
                          f"ids (specials included): set model.vocab_size={tokenizer.vocab_size}")
    if lm_source:
        check_tokenizer_matches_lm(tokenizer, lm_source)
        config.tokenizer.path = str((run_dir / LM_FILES_DIR).resolve())  # written below: the run needs no Hub
    resume_from = prepare_run_dir(config, run_dir, resume, dist)
    if lm_source and dist.is_main and resume_from is None:
        save_lm_files(lm_source, tokenizer, run_dir / LM_FILES_DIR)
    barrier(dist)

    torch.manual_seed(tc.seed)  # identical initial weights on every rank
    if dist.distributed:  # no process ever holds the full model: build on meta, shard, then initialise shards
        with torch.device("meta"):
            model = TransfusionMoT(config.model)
    else:
        model = TransfusionMoT(config.model).to(device)
    frozen = freeze_parameters(model, tc.freeze)  # before FSDP2: the sharded parameters inherit the flags
    accounting = parameter_accounting(model, seq_len=config.data.token_budget or config.model.max_seq_len)
    objective = make_objective(config.model)
    step_module = TransfusionStep(model, objective)
    if tc.activation_checkpointing:
        apply_activation_checkpointing(model)
    if tc.compile:
        apply_compile(model)
    if dist.distributed:
        apply_fsdp(step_module, model.blocks, bf16=precision == "bf16")
        model.to_empty(device=device)
        torch.manual_seed(tc.seed)
        model.reset_parameters()  # each process draws every tensor whole and keeps its own shard
    if lm_source and resume_from is None:  # a resumed run's weights come from its checkpoint
        load_lm_weights(model, lm_source)
    if frozen and dist.is_main:
        warn_about_shared_weights(config, frozen)
    # the fused AdamW kernel (CPU and CUDA) is 2-3x faster than the per-tensor loop; sharded (FSDP2) parameters
    # keep the default implementation
    optimizer = torch.optim.AdamW(param_groups(model, oc.weight_decay, oc.lr_mult), lr=oc.lr, betas=tuple(oc.betas), eps=oc.eps,
                                  fused=not dist.distributed)
    ema = EMA(model, oc.ema_decay) if oc.ema_decay > 0 else None
    stream, latent_shape, vae_path, vae_model = build_stream(config, tokenizer, dist.rank, dist.world_size, device)
    collator = Collator(config.model, tokenizer.specials, max_len=config.model.max_seq_len)
    validation, source = None, None
    missing = missing_held_out(config.data) if tc.eval_every else None
    if tc.eval_every and missing is None:
        validation, source = build_validation(config, tokenizer, collator, objective, latent_shape, vae_model, device)
    elif missing and dist.is_main:
        print(f"note: train.eval_every is {tc.eval_every} but {missing}: training without held-out losses (a "
              "val cache: `tmot vae encode --split val`)", file=sys.stderr)
    torch.manual_seed(tc.seed * 1_000_003 + dist.rank)
    noise = torch.Generator().manual_seed(tc.seed * 7_919 + dist.rank)
    batches = build_batches(config, stream, collator)
    trainer = Trainer(config, run_dir, dist, device, model, step_module, optimizer, ema, batches, noise, precision,
                      accounting, validation=validation, vae_path=vae_path)
    if resume_from is not None:
        trainer.load(resume_from, verified=True)  # prepare_run_dir chose it by its content check
    return ComposedRun(trainer, accounting, tuple(latent_shape), resume_from, source)


def run_summary(run: ComposedRun, result: TrainResult) -> dict[str, Any]:
    """summary.json: parameters and FLOPs, where and how the run trained, how it ended, held-out results."""
    trainer, acc, config, p = run.trainer, run.accounting, run.trainer.config, run.trainer.progress
    summary = {
        "parameters": {"total": acc["total_params"], "shared": acc["shared_params"],
                       "per_modality": acc["params_per_modality"], "active_per_token": acc["active_params_per_token"]},
        "train_flops_per_token": acc["train_flops_per_token"], "flops_seq_len": acc["flops_seq_len"],
        "model": {"untie": config.model.untie, "dim": config.model.dim, "n_layers": config.model.n_layers,
                  "init_from": config.model.init_from, "freeze": config.train.freeze},
        "trainable_parameters": sum(w.numel() for w in trainer.model.parameters() if w.requires_grad),
        "world_size": trainer.dist.world_size, "device": str(trainer.device), "precision": trainer.precision,
        "latent_shape": list(run.latent_shape), "vae": p.vae,
        "resumed_from": str(run.resumed_from) if run.resumed_from else None,
        "status": result.status, "step": result.step, "wall_time_s": result.wall_time_s, "train_time_s": p.train_time,
        "tokens_seen": p.tokens_seen, "skipped_steps": p.skipped_steps, "failed_saves": trainer.failed_saves,
        "data_mix": trainer.batches.stream.counts, "last_checkpoint": str(result.checkpoint) if result.checkpoint else None}
    if trainer.validation is not None:
        tc = config.train
        summary["validation"] = validation_summary(trainer.run_dir, run.validation_source,
                                                   trainer.validation.num_samples, tc.eval_seed, tc.eval_every,
                                                   trainer.validation.bucket_names)
    return summary


def train(config: RunConfig, run_dir: str | Path, resume: bool = False) -> TrainResult:
    """Train (or resume) a run; the Python entry point behind `tmot train`."""
    dist = init_distributed("cuda" if config.train.device != "cpu" and torch.cuda.is_available() else "cpu")
    try:
        run = build_run(config, run_dir, resume, dist)
        result = run.trainer.run()
        if dist.is_main:
            result.summary = run_summary(run, result)
            write_summary(Path(run_dir), result.summary)
        if result.status == "diverged":
            p = run.trainer.progress
            raise TrainingError(f"{p.bad_in_a_row} consecutive steps had a non-finite loss or gradient (step "
                                f"{result.step}); stopped. The last good checkpoint is "
                                f"{result.checkpoint or '(none yet)'}; lower optim.lr or check the data, then --resume")
        return result
    finally:
        shutdown_distributed()


__all__ = ["ComposedRun", "build_run", "build_validation", "prepare_builtin_data", "prepare_data_tokenizer",
           "prepare_run_dir", "run_summary", "train"]
