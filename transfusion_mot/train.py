"""`tmot train`: the Transfusion training loop, one process or many (torchrun + FSDP2).

One optimizer step: `grad_accum` micro-batches of `batch_size` samples per process (caption-first,
image-first, caption-dropped and text-only samples mixed as the data config says), L = L_LM + lambda L_diff,
backward, one all-reduce of the step's statistics, gradient clipping, AdamW, EMA. A step whose loss or
gradient norm is not finite is skipped and counted; `max_bad_steps` in a row stop the run.

Everything a step consumes (data positions, mixing draws, timesteps and noise) comes from generators
whose states are checkpointed, so `--resume` continues bit-for-bit where the run stopped (same device
and world size). SIGTERM / Ctrl-C finish the current step, save a checkpoint and exit cleanly.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint as ckpt
from .accounting import parameter_accounting
from .batch import Batch, Collator
from .config import ConfigError, TrainingError
from .curves import read_metrics
from .diffusion import DiffusionObjective, make_objective
from .losses import transfusion_loss
from .model import TransfusionMoT
from .optim import EMA, param_groups, warmup_cosine
from .parallel import (DistInfo, all_reduce_sum, apply_activation_checkpointing, apply_compile, apply_fsdp,
                       barrier, init_distributed, shutdown_distributed)
from .run import (RESUMABLE_KEYS, RunConfig, config_differences, load_run_config, resolve_precision,
                  save_run_config)
from .validation import ValidationSet, load_validation_pairs


@dataclass
class TrainResult:
    status: str  # completed | stopped | diverged
    step: int
    run_dir: Path
    checkpoint: Path | None
    summary: dict[str, Any]


class TransfusionStep(nn.Module):
    """The loss as a module, so under FSDP2 the heads run inside the root's forward (the root module is
    what gets sharded last). Holds the plain model; parameters are the model's."""

    def __init__(self, model: TransfusionMoT, objective: DiffusionObjective) -> None:
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch: Batch, generator: torch.Generator | None = None, **draws: Any) -> dict[str, torch.Tensor]:
        """Training: draws from `generator`. Validation: fixed `timesteps`, `noise` and `details=True`."""
        return transfusion_loss(self.model, batch, self.objective, generator, **draws)


# --------------------------------------------------------------------------------------------------
# building blocks


def resolve_device(name: str, info: DistInfo) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device is cuda but no CUDA device is available")
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def build_stream(config: RunConfig, tokenizer: Any, info: DistInfo, device: torch.device):
    """(TrainingStream of this rank, latent shape, the VAE path the latents belong to, the VAE model when
    images are encoded on the fly, else None)."""
    from vae.latents import LatentDataset, LatentStream

    from .data.mixing import ImagePairSource, TrainingStream, read_text_documents

    data, seed = config.data, config.train.seed
    if not data.path:
        raise ConfigError("data.path is not set: pass --data (a latent cache, image folder or shard pattern) "
                          "or set data.builtin: shapes")
    vae_path = config.vae.path
    vae_model = None
    if data.kind == "latents":
        dataset = LatentDataset(data.path)
        latent_shape = tuple(dataset.latent_shape)
        vae_path = vae_path or dataset.info.get("vae")
        source = ImagePairSource(LatentStream(dataset, seed=seed, rank=info.rank, world_size=info.world_size,
                                              drop_last=True))
    else:
        from vae import load_vae

        if not vae_path:
            raise ConfigError(f"data.kind {data.kind!r} encodes images on the fly: set vae.path (or --vae)")
        vae_model = load_vae(vae_path, device=device)
        vae_model.requires_grad_(False).eval()
        size = data.image_size or int(vae_model.config.sample_size)
        if data.kind == "folder":
            from .data.readers import ImageFolderReader

            stream = LatentStream(ImageFolderReader(data.path, split=data.split, size=size), seed=seed,
                                  rank=info.rank, world_size=info.world_size, drop_last=True)
        else:
            from .data.readers import WebDatasetReader

            stream = WebDatasetReader(data.path, shuffle_buffer=data.shuffle_buffer, seed=seed, rank=info.rank,
                                      world_size=info.world_size, size=size)
        factor = 2 ** (len(vae_model.config.block_out_channels) - 1)
        latent_shape = (int(vae_model.config.latent_channels), size // factor, size // factor)
        source = ImagePairSource(stream, vae=vae_model, device=device)
    text_stream = None
    if data.text_only_path and data.text_only_ratio > 0:
        docs = read_text_documents(data.text_only_path)
        text_stream = LatentStream(docs, seed=seed + 7919, rank=0, world_size=1)  # any rank order works
    max_doc = (data.token_budget or config.model.max_seq_len) - 2  # BOS and EOS
    stream = TrainingStream(source, tokenizer, seed=seed, rank=info.rank,
                            image_first_ratio=data.image_first_ratio, caption_dropout=data.caption_dropout,
                            text_stream=text_stream, text_only_ratio=data.text_only_ratio,
                            max_text_tokens=config.tokenizer.max_text_tokens, overflow=config.tokenizer.overflow,
                            max_doc_tokens=max_doc)
    return stream, latent_shape, vae_path, vae_model


def check_latent_shape(config: RunConfig, latent_shape: tuple[int, ...]) -> None:
    c, h, w = latent_shape
    m = config.model
    if c != m.latent_channels:
        raise ConfigError(f"the data's latents have {c} channels but model.latent_channels is {m.latent_channels}")
    if h % m.patch_size or w % m.patch_size:
        raise ConfigError(f"latents {h}x{w} are not divisible by model.patch_size {m.patch_size}")


def _load_into(params: dict[str, torch.Tensor], full: dict[str, torch.Tensor], what: str) -> None:
    """Copy full tensors into (possibly sharded) tensors: each rank keeps its own shard."""
    names = {ckpt.clean_key(k): v for k, v in params.items()}
    missing = sorted(set(names) - set(full))
    if missing:
        raise TrainingError(f"{what}: checkpoint lacks {len(missing)} tensors, e.g. {missing[0]}")
    for name, target in names.items():
        source = full[name]
        with torch.no_grad():
            if hasattr(target, "device_mesh"):  # DTensor: keep the local shard of the full tensor
                from torch.distributed.tensor import distribute_tensor

                shard = distribute_tensor(source.to(target.device, target.dtype), target.device_mesh,
                                          target.placements)
                target.to_local().copy_(shard.to_local())
            else:
                target.copy_(source.to(target.device, target.dtype))


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class _StopRequest:
    """SIGTERM / SIGINT handler: ask the loop to stop after the current step (a second Ctrl-C aborts)."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopRequest":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers, no graceful stop
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------------------------------
# the trainer


class Trainer:
    def __init__(self, config: RunConfig, run_dir: str | Path, resume: bool = False) -> None:
        from .tokenizer import load_tokenizer

        self.config = config
        self.run_dir = Path(run_dir)
        tc = config.train
        self.info = init_distributed("cuda" if tc.device != "cpu" and torch.cuda.is_available() else "cpu")
        self.device = resolve_device(tc.device, self.info)
        self.precision = resolve_precision(tc.precision, self.device)
        self.bf16 = self.precision == "bf16"
        if config.data.path is None and config.data.builtin:
            self._prepare_builtin()

        self.tokenizer = load_tokenizer(config.tokenizer)
        if self.tokenizer.vocab_size != config.model.vocab_size:
            raise ConfigError(f"model.vocab_size is {config.model.vocab_size} but the tokenizer has "
                              f"{self.tokenizer.vocab_size} ids (specials included): set "
                              f"model.vocab_size={self.tokenizer.vocab_size}")
        self.start_step = 0
        self.resume_from = self._prepare_run_dir(resume)

        torch.manual_seed(tc.seed)  # identical initial weights on every rank
        self.model = TransfusionMoT(config.model).to(self.device)
        self.accounting = parameter_accounting(self.model, seq_len=config.data.token_budget or
                                               config.model.max_seq_len)
        self.objective = make_objective(config.model)
        self.step_module = TransfusionStep(self.model, self.objective)
        if tc.activation_checkpointing:
            apply_activation_checkpointing(self.model)
        if tc.compile:
            apply_compile(self.model)
        if self.info.distributed:
            apply_fsdp(self.step_module, self.model.blocks, bf16=self.bf16)
        oc = config.optim
        self.optimizer = torch.optim.AdamW(param_groups(self.model, oc.weight_decay), lr=oc.lr,
                                           betas=tuple(oc.betas), eps=oc.eps)
        self.ema = EMA(self.model, oc.ema_decay) if oc.ema_decay > 0 else None
        self.stream, latent_shape, self.vae_path, vae_model = build_stream(config, self.tokenizer, self.info,
                                                                           self.device)
        check_latent_shape(config, latent_shape)
        self.latent_shape = latent_shape
        self.collator = Collator(config.model, self.tokenizer.specials, max_len=config.model.max_seq_len)
        self.validation, self.validation_source = self._build_validation(vae_model) if tc.eval_every else (None, None)
        torch.manual_seed(tc.seed * 1_000_003 + self.info.rank)
        self.noise = torch.Generator().manual_seed(tc.seed * 7_919 + self.info.rank)
        self.skipped_steps = 0
        self.bad_in_a_row = 0
        self.tokens_seen = 0
        self.failed_saves = 0
        self.train_time = 0.0  # seconds spent in training steps (no evaluation, no checkpointing)
        if self.resume_from is not None:
            self._load(self.resume_from)

    def _build_validation(self, vae_model: Any) -> tuple[ValidationSet, str]:
        """The held-out set with its fixed draws; every rank scores all of it (identical forwards, as FSDP
        needs), so no reduction is needed."""
        config = self.config
        size = config.data.image_size or (int(vae_model.config.sample_size) if vae_model is not None else None)
        pairs, source = load_validation_pairs(config.data, config.train.eval_samples, vae=vae_model,
                                              device=self.device, image_size=size)
        shapes = {tuple(latent.shape) for latent, _ in pairs}
        if shapes != {tuple(self.latent_shape)}:
            raise ConfigError(f"validation data {source}: latents of shape {sorted(shapes)}, but the training data's "
                              f"are {tuple(self.latent_shape)}; use held-out data encoded by the same VAE")
        valset = ValidationSet(pairs, self.tokenizer, self.collator, self.objective, seed=config.train.eval_seed,
                               batch_size=config.train.eval_batch_size,
                               max_text_tokens=config.tokenizer.max_text_tokens, overflow=config.tokenizer.overflow,
                               device=self.device)
        return valset, source

    def evaluate(self) -> dict[str, float]:
        """Held-out losses of the current weights (and of the EMA weights with train.eval_ema)."""
        weight = self.config.model.image_loss_weight
        step_module = self.step_module

        def loss_fn(batch: Batch, **draws: Any) -> dict[str, torch.Tensor]:
            return step_module(batch, None, **draws)

        self.model.eval()
        try:
            with self._autocast():
                result = self.validation.evaluate(loss_fn, weight)
                if self.ema is not None and self.config.train.eval_ema:
                    params = dict(self.model.named_parameters())
                    raw = {name: p.detach().clone() for name, p in params.items()}
                    self.ema.copy_to(self.model)
                    try:
                        ema = self.validation.evaluate(loss_fn, weight)
                    finally:
                        with torch.no_grad():
                            for name, p in params.items():
                                p.copy_(raw[name])
                    result.update({"val_ema_" + k[len("val_"):]: v for k, v in ema.items()})
        finally:
            self.model.train()
        return result

    def _prepare_builtin(self) -> None:
        """Build (main process) or wait for the built-in data set, then point data/vae/tokenizer at it."""
        from .prepare import prepare_for_run

        if self.info.is_main:
            prepare_for_run(self.config, progress=self.config.train.progress)
        barrier(self.info)
        if not self.info.is_main:
            prepare_for_run(self.config, build=False)

    # -- run directory -----------------------------------------------------------------------------

    def _prepare_run_dir(self, resume: bool) -> Path | None:
        existing = ckpt.latest_checkpoint(self.run_dir)
        saved_config = self.run_dir / "config.yaml"
        if resume:
            if existing is None:
                raise FileNotFoundError(f"--resume: no checkpoint in {self.run_dir}/checkpoints to resume from")
            if saved_config.is_file():
                diff = config_differences(load_run_config(saved_config), self.config, ignore=RESUMABLE_KEYS)
                if diff:
                    raise ConfigError(f"--resume: the config differs from the run's config.yaml in {diff}; only "
                                      f"{', '.join(RESUMABLE_KEYS)} may change when resuming")
        elif existing is not None:
            raise ConfigError(f"{self.run_dir} already holds checkpoints: pass --resume to continue it, "
                              "or choose a new --out")
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_run_config(self.config, self.run_dir / "config.yaml")
        barrier(self.info)
        return existing if resume else None

    # -- checkpoints -------------------------------------------------------------------------------

    def _load(self, path: Path) -> None:
        state = json.loads((path / "state.json").read_text())
        if state["world_size"] != self.info.world_size:
            raise TrainingError(f"{path} was written by {state['world_size']} processes; resume with the same "
                                f"number (got {self.info.world_size}) so data order and RNG streams match")
        _load_into(dict(self.model.named_parameters()), ckpt.load_tensors(path / "model.safetensors"),
                   "model weights")
        if self.ema is not None:
            if not (path / "ema.safetensors").is_file():
                raise TrainingError(f"{path}: no ema.safetensors but optim.ema_decay > 0")
            _load_into(self.ema.shadow, ckpt.load_tensors(path / "ema.safetensors"), "EMA weights")
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        optim_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        set_optimizer_state_dict(self.model, self.optimizer, optim_state,
                                 options=StateDictOptions(full_state_dict=True))
        rank_state = torch.load(path / f"rank_{self.info.rank}.pt", map_location="cpu", weights_only=True)
        self.stream.load_state_dict(rank_state["data"])
        self.noise.set_state(rank_state["noise"])
        _set_rng_state(rank_state["rng"], self.device)
        self.start_step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.bad_in_a_row = int(state.get("bad_in_a_row", 0))
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.train_time = float(state.get("train_time_s", 0.0))

    def save(self, step: int) -> Path | None:
        """Write checkpoint `step`; on failure warn, leave every earlier checkpoint untouched, return None."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        # collectives first (every rank), file writes after
        weights = ckpt.full_state_dict(dict(self.model.named_parameters()))
        ema = ckpt.full_state_dict(self.ema.shadow) if self.ema is not None else None
        optim_state = get_optimizer_state_dict(self.model, self.optimizer,
                                               options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        error = None
        try:
            if self.info.is_main:
                ckpt.begin_checkpoint(self.run_dir, step)
            barrier(self.info)
            tmp = ckpt.staging_dir(self.run_dir, step)
            meta = {"format": "tmot-checkpoint/1", "step": str(step)}
            if self.info.is_main:
                ckpt.save_tensors(weights, tmp / "model.safetensors", meta)
                if ema is not None:
                    ckpt.save_tensors(ema, tmp / "ema.safetensors", meta)
                torch.save(optim_state, tmp / "optimizer.pt")
            torch.save({"data": self.stream.state_dict(), "noise": self.noise.get_state(),
                        "rng": _rng_state(self.device)}, tmp / f"rank_{self.info.rank}.pt")
        except Exception as err:  # disk full, permissions, ...: keep training, keep the old checkpoints
            error = err
        failed = all_reduce_sum(torch.tensor([float(error is not None)]), self.info).item() > 0
        if not failed and self.info.is_main:
            try:
                ckpt.commit_checkpoint(self.run_dir, step, self._state(step), self.config.train.keep_checkpoints)
            except Exception as err:
                error = err
        # every rank learns whether the commit worked
        failed = failed or all_reduce_sum(torch.tensor([float(error is not None)]), self.info).item() > 0
        if failed:
            self.failed_saves += 1
            if self.info.is_main:
                ckpt.abort_checkpoint(self.run_dir, step)
                previous = ckpt.latest_checkpoint(self.run_dir)
                print(f"warning: could not save checkpoint step_{step} ({type(error).__name__ if error else 'error'}: "
                      f"{error}); the previous checkpoint {previous or '(none)'} is intact", file=sys.stderr)
        barrier(self.info)
        return None if failed else self.run_dir / ckpt.CHECKPOINT_DIR / f"step_{step}"

    def _state(self, step: int) -> dict[str, Any]:
        return {"step": step, "world_size": self.info.world_size, "skipped_steps": self.skipped_steps,
                "bad_in_a_row": self.bad_in_a_row, "tokens_seen": self.tokens_seen, "time": time.time(),
                "train_time_s": self.train_time, "vae": self.vae_path}

    # -- the loop ----------------------------------------------------------------------------------

    def _autocast(self):
        if not self.bf16:
            return nullcontext()
        # RMSNorm weights stay fp32 under autocast; torch notes (once per process) that it then skips
        # its fused kernel, which is expected here
        warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def _collate(self) -> Batch:
        samples = self.stream.next_samples(self.config.train.batch_size)
        if self.config.data.packing:
            return self.collator.collate_packed(samples, self.config.data.token_budget)
        return self.collator.collate_padded(samples)

    def train_step(self, step: int, stop_requested: bool = False) -> dict[str, float]:
        """One optimizer step. `stop_requested` (this process got SIGTERM/Ctrl-C) is shared with every rank in
        the step's one all-reduce; the result's "stop" says whether any rank asked."""
        tc, oc = self.config.train, self.config.optim
        lr = warmup_cosine(step, oc.lr, oc.warmup_steps, oc.decay_steps or tc.max_steps, oc.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        sums = torch.zeros(4, dtype=torch.float64)  # loss, text, image, tokens
        for micro in range(tc.grad_accum):
            batch = self._collate().to(self.device)
            if self.info.distributed:
                self.step_module.set_requires_gradient_sync(micro == tc.grad_accum - 1)
            with self._autocast():
                losses = self.step_module(batch, self.noise)
            (losses["loss"] / tc.grad_accum).backward()
            stats = torch.stack([losses["loss"].detach().float(), losses["text_loss"].detach().float(),
                                 losses["image_loss"].detach().float()]).cpu().double()
            sums[:3] += stats / tc.grad_accum
            sums[3] += float((batch.doc_ids >= 0).sum())
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                   oc.grad_clip if oc.grad_clip > 0 else math.inf)
        grad_norm = ckpt.full_tensor(grad_norm).float().cpu()
        # one all-reduce: mean losses over ranks, total tokens, and whether any rank saw a non-finite value
        local_bad = float(not torch.isfinite(sums[:3]).all())
        flags = torch.tensor([local_bad, float(stop_requested)], dtype=torch.float64)
        reduced = all_reduce_sum(torch.cat([sums, flags]), self.info)
        world = self.info.world_size
        bad = reduced[4].item() > 0 or not math.isfinite(grad_norm.item())
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            self.bad_in_a_row += 1
        else:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.update(self.model)
            self.bad_in_a_row = 0
        tokens = int(reduced[3].item())
        self.tokens_seen += tokens
        return {"loss": reduced[0].item() / world, "text_loss": reduced[1].item() / world,
                "image_loss": reduced[2].item() / world, "lr": lr, "grad_norm": grad_norm.item(),
                "tokens": tokens, "skipped": bad, "stop": reduced[5].item() > 0}

    def run(self) -> TrainResult:
        tc = self.config.train
        logger = MetricsLogger(self.run_dir, self.start_step, enabled=self.info.is_main,
                               tensorboard=tc.tensorboard)
        summary = self._summary_start()
        last_saved: Path | None = ckpt.latest_checkpoint(self.run_dir)
        last_saved_step = self.start_step if self.resume_from is not None else -1
        status = "completed"
        step = self.start_step
        bar = None
        if self.info.is_main and tc.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=tc.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
        window_tokens, window_start = 0, time.perf_counter()
        t0 = time.perf_counter()
        self.model.train()
        try:
            with _StopRequest() as stop:
                while step < tc.max_steps:
                    t_step = time.perf_counter()
                    out = self.train_step(step, stop_requested=stop.signal is not None)
                    self.train_time += time.perf_counter() - t_step
                    step += 1
                    window_tokens += out["tokens"]
                    if self.bad_in_a_row >= tc.max_bad_steps:
                        status = "diverged"
                        break
                    evaluate = self.validation is not None and (step % tc.eval_every == 0 or step == tc.max_steps)
                    if step % tc.log_every == 0 or step == tc.max_steps or evaluate:
                        now = time.perf_counter()
                        tokens_per_s = window_tokens / max(now - window_start, 1e-9)
                        record = {"step": step, "loss": out["loss"], "text_loss": out["text_loss"],
                                  "image_loss": out["image_loss"], "lr": out["lr"], "tokens_per_s": tokens_per_s,
                                  "grad_norm": out["grad_norm"], "skipped_steps": self.skipped_steps,
                                  "tokens_seen": self.tokens_seen, "elapsed_s": now - t0,
                                  "train_time_s": self.train_time}
                        if evaluate:
                            record.update(self.evaluate())
                            record["eval_s"] = time.perf_counter() - now
                        window_tokens, window_start = 0, time.perf_counter()  # evaluation is not training time
                        logger.log(record)
                        if bar is not None:
                            bar.set_postfix(loss=f"{out['loss']:.3f}", text=f"{out['text_loss']:.3f}",
                                            image=f"{out['image_loss']:.3f}", tok_s=f"{tokens_per_s:,.0f}",
                                            refresh=False)
                    if bar is not None:
                        bar.update(1)
                    requested = out["stop"]
                    if step % tc.save_every == 0 or step == tc.max_steps or requested:
                        saved = self.save(step)
                        if saved is not None:
                            last_saved, last_saved_step = saved, step
                        elif step == tc.max_steps or requested:
                            raise TrainingError(f"could not save the checkpoint of step {step}; the previous one "
                                                f"({last_saved or 'none'}) is intact; see the warning above")
                    if requested:
                        status = "stopped"
                        break
        finally:
            if bar is not None:
                bar.close()
            logger.close()
        summary.update(self._summary_end(status, step, time.perf_counter() - t0, last_saved))
        if self.validation is not None and self.info.is_main:
            summary["validation"] = self._validation_summary()
        if self.info.is_main:
            _write_json(self.run_dir / "summary.json", summary)
        if status == "diverged":
            raise TrainingError(f"{self.bad_in_a_row} consecutive steps had a non-finite loss or gradient (step "
                                f"{step}); stopped. The last good checkpoint is {last_saved or '(none yet)'} "
                                f"(step {max(last_saved_step, 0)}); lower optim.lr or check the data, then --resume")
        return TrainResult(status, step, self.run_dir, last_saved, summary)

    def _summary_start(self) -> dict[str, Any]:
        acc = self.accounting
        return {"parameters": {"total": acc["total_params"], "shared": acc["shared_params"],
                               "per_modality": acc["params_per_modality"],
                               "active_per_token": acc["active_params_per_token"]},
                "train_flops_per_token": acc["train_flops_per_token"], "flops_seq_len": acc["flops_seq_len"],
                "model": {"untie": self.config.model.untie, "dim": self.config.model.dim,
                          "n_layers": self.config.model.n_layers},
                "world_size": self.info.world_size, "device": str(self.device),
                "precision": self.precision, "latent_shape": list(self.latent_shape),
                "vae": self.vae_path, "resumed_from": str(self.resume_from) if self.resume_from else None}

    def _validation_summary(self) -> dict[str, Any]:
        """Where the held-out set came from, the last evaluation and the best image loss of the whole run
        (read back from metrics.jsonl, so a resumed run includes evaluations from before the resume)."""
        records = read_metrics(self.run_dir)
        evals = [{k: v for k, v in r.items() if k == "step" or k.startswith("val_")} for r in records
                 if "val_image_loss" in r]
        best = min(evals, key=lambda r: r["val_image_loss"]) if evals else None
        return {"source": self.validation_source, "samples": self.validation.num_samples,
                "draw_seed": self.config.train.eval_seed, "every": self.config.train.eval_every,
                "timestep_buckets": self.validation.bucket_names, "evaluations": len(evals),
                "final": evals[-1] if evals else None,
                "best_image_loss": {"step": best["step"], "val_image_loss": best["val_image_loss"]} if best else None}

    def _summary_end(self, status: str, step: int, seconds: float, last: Path | None) -> dict[str, Any]:
        return {"status": status, "step": step, "wall_time_s": seconds, "train_time_s": self.train_time,
                "tokens_seen": self.tokens_seen,
                "skipped_steps": self.skipped_steps, "failed_saves": self.failed_saves,
                "data_mix": self.stream.counts, "last_checkpoint": str(last) if last else None}


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)


class MetricsLogger:
    """metrics.jsonl (one object per logged step) and TensorBoard events, on the main process.

    On resume, lines logged after the resumed checkpoint are dropped: those steps are re-run."""

    def __init__(self, run_dir: Path, start_step: int, enabled: bool, tensorboard: bool) -> None:
        self.enabled = enabled
        self.writer = None
        self.file = None
        if not enabled:
            return
        path = run_dir / "metrics.jsonl"
        if path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= start_step]
            path.write_text("".join(line + "\n" for line in kept))
        self.file = path.open("a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step":  # val_image_loss -> val/image_loss
                    tag = f"val/{key[len('val_'):]}" if key.startswith("val_") else f"train/{key}"
                    self.writer.add_scalar(tag, value, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


def train(config: RunConfig, run_dir: str | Path, resume: bool = False) -> TrainResult:
    """Train (or resume) a run; the Python entry point behind `tmot train`."""
    try:
        return Trainer(config, run_dir, resume=resume).run()
    finally:
        shutdown_distributed()
