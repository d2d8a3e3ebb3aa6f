"""The Transfusion training loop, one process or many (torchrun + FSDP2), over parts built elsewhere
(`transfusion_mot.recipes.train` composes them from a run config).

One optimizer step: `grad_accum` micro-batches of `batch_size` rows per process (padded samples or packed
rows), L = L_LM + lambda L_diff, backward, one all-reduce of the step's statistics (losses, tokens, FLOPs,
padding, flags), gradient clipping, AdamW, EMA. A step whose loss or
gradient norm is not finite is skipped and counted; `max_bad_steps` in a row stop the run.

Everything a step consumes (data positions, mixing draws, timesteps and noise) comes from generators whose
states are checkpointed with the weights, EMA and optimizer (`state.py`), so `--resume` continues
bit-for-bit where the run stopped (same device and number of processes; on another number the data
position is re-split and the random streams re-seeded). SIGTERM / Ctrl-C finish the current step,
save a checkpoint and exit cleanly.
"""

from __future__ import annotations

import math
import signal
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..accounting import batch_train_flops
from ..batch import Batch
from ..common.checkpoint import Bundle, Checkpointer, CheckpointSaveError, GeneratorState, TorchRNGState
from ..common.errors import TrainingError
from ..common.schedule import warmup_cosine
from ..diffusion import DiffusionObjective
from ..losses import transfusion_loss
from ..model import TransfusionMoT
from .metrics import MetricsLogger
from .optim import EMA
from .parallel import DistInfo, all_reduce_sum, any_rank, barrier
from .state import CHECKPOINT_DIR, CHECKPOINT_FORMAT, RANK_FILE, RunProgress, TrainingState, full_tensor
from .stream import PackedBatches, PaddedBatches
from .throughput import mfu, peak_tflops
from .validation import ValidationSet


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


@dataclass
class TrainResult:
    status: str  # completed | stopped | diverged (max_bad_steps non-finite steps in a row)
    step: int
    run_dir: Path
    checkpoint: Path | None  # the last checkpoint saved
    wall_time_s: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)  # what summary.json says (filled by the caller)


class StopRequest:
    """SIGTERM / SIGINT handler: ask the loop to stop after the current step (a second Ctrl-C aborts)."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
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


class Trainer:
    """Runs the loop on built parts: `step_module` (the loss around `model`, FSDP-wrapped or not), its
    optimizer and EMA, this process's micro-batches (`batches`: padded or packed rows of its sample stream)
    and `noise` generator, and optionally a held-out set. Every stateful part goes into one checkpointer;
    `load` resumes from a checkpoint. `accounting` (`parameter_accounting`) gives the FLOPs behind MFU."""

    def __init__(self, config: Any, run_dir: str | Path, dist: DistInfo, device: torch.device, model: TransfusionMoT,
                 step_module: TransfusionStep, optimizer: torch.optim.Optimizer, ema: EMA | None,
                 batches: PaddedBatches | PackedBatches, noise: torch.Generator, precision: str,
                 accounting: dict[str, Any], validation: ValidationSet | None = None,
                 vae_path: str | None = None) -> None:
        self.config, self.run_dir, self.dist, self.device = config, Path(run_dir), dist, device
        self.model, self.step_module, self.optimizer, self.ema = model, step_module, optimizer, ema
        self.batches, self.noise, self.validation = batches, noise, validation
        self.precision, self.accounting = precision, accounting
        self.bf16 = precision == "bf16"
        self.peak = peak_tflops(device, config.train.peak_tflops)
        self.progress = RunProgress(dist.world_size, vae_path)
        self.state = TrainingState(model, optimizer, ema, sharded=dist.distributed, seed=config.train.seed)
        self.per_rank = Bundle(data=batches, noise=GeneratorState(noise), rng=TorchRNGState(device))
        self.checkpointer = Checkpointer(
            self.run_dir / CHECKPOINT_DIR, {**self.state.parts(), RANK_FILE: self.per_rank},
            keep=config.train.keep_checkpoints,
            progress=self.progress, metadata={"format": CHECKPOINT_FORMAT}, rank=dist.rank, is_main=dist.is_main,
            any_rank=lambda flag: any_rank(flag, dist), barrier=lambda: barrier(dist))
        self.failed_saves = 0

    def load(self, checkpoint: Path, verified: bool = False) -> None:
        """Resume from `checkpoint`, written by any number of processes (see `TrainingState.load`);
        `verified`: its content check has just passed (`latest_intact_checkpoint`)."""
        self.state.load(checkpoint, self.checkpointer, self.progress, self.dist, self.per_rank, verify=not verified)

    def save(self, step: int, final: bool) -> Path | None:
        """Checkpoint `step`. A failed periodic save is a warning (training goes on, earlier checkpoints are
        intact); a failed final save is an error."""
        self.progress.step = step
        try:
            return self.checkpointer.save(step)
        except CheckpointSaveError as err:
            self.failed_saves += 1
            if self.dist.is_main:
                print(f"warning: {err}", file=sys.stderr)
            if final:
                raise TrainingError(f"{err}; see the warning above") from None
            return None

    # -- one step ----------------------------------------------------------------------------------

    def autocast(self):
        if not self.bf16:
            return nullcontext()
        # RMSNorm weights stay fp32 under autocast; torch notes (once per process) that it then skips
        # its fused kernel, which is expected here
        warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def train_step(self, step: int, stop_requested: bool = False) -> dict[str, Any]:
        """One optimizer step. `stop_requested` (this process got SIGTERM/Ctrl-C) is shared with every rank in
        the step's one all-reduce; the result's "stop" says whether any rank asked."""
        tc, oc = self.config.train, self.config.optim
        lr = warmup_cosine(step, oc.lr, oc.warmup_steps, oc.decay_steps or tc.max_steps, oc.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        # loss, text, image (means over micro-batches); tokens, FLOPs, padding positions, positions (sums)
        sums = torch.zeros(7, dtype=torch.float64)
        for micro in range(tc.grad_accum):
            batch = self.batches.next_batch()
            real = batch.doc_ids >= 0
            sums[3:] += torch.tensor([float(real.sum()), batch_train_flops(
                self.accounting, batch.modality, batch.doc_ids, self.config.model.modalities),
                float((~real).sum()), float(real.numel())], dtype=torch.float64)
            batch = batch.to(self.device)
            if self.dist.distributed:
                self.step_module.set_requires_gradient_sync(micro == tc.grad_accum - 1)
            with self.autocast():
                losses = self.step_module(batch, self.noise)
            (losses["loss"] / tc.grad_accum).backward()
            stats = torch.stack([losses["loss"].detach().float(), losses["text_loss"].detach().float(),
                                 losses["image_loss"].detach().float()]).cpu().double()
            sums[:3] += stats / tc.grad_accum
        clip = oc.grad_clip if oc.grad_clip > 0 else math.inf
        grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)).float().cpu()
        # one all-reduce: mean losses over ranks, totals, and whether any rank saw a non-finite value
        flags = torch.tensor([float(not torch.isfinite(sums[:3]).all()), float(stop_requested)], dtype=torch.float64)
        reduced = all_reduce_sum(torch.cat([sums, flags]), self.dist).tolist()
        bad = reduced[7] > 0 or not math.isfinite(grad_norm.item())
        if not bad:
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        p = self.progress
        p.skipped_steps, p.bad_in_a_row = p.skipped_steps + bad, (p.bad_in_a_row + 1) if bad else 0
        p.tokens_seen += int(reduced[3])
        world = self.dist.world_size
        return {"loss": reduced[0] / world, "text_loss": reduced[1] / world, "image_loss": reduced[2] / world,
                "lr": lr, "grad_norm": grad_norm.item(), "tokens": int(reduced[3]), "flops": reduced[4],
                "padding": reduced[5], "positions": reduced[6], "stop": reduced[8] > 0}

    def evaluate(self) -> dict[str, float]:
        """Held-out losses of the current weights (and of the EMA weights with train.eval_ema)."""
        weight = self.config.model.image_loss_weight

        def loss_fn(batch: Batch, **draws: Any) -> dict[str, torch.Tensor]:
            return self.step_module(batch, None, **draws)

        self.model.eval()
        try:
            with self.autocast():
                result = self.validation.evaluate(loss_fn, weight)
                if self.ema is not None and self.config.train.eval_ema:
                    params = dict(self.model.named_parameters())
                    raw = {name: p.detach().clone() for name, p in params.items()}
                    self.ema.copy_to(self.model)
                    try:
                        result.update({"val_ema_" + k[len("val_"):]: v
                                       for k, v in self.validation.evaluate(loss_fn, weight).items()})
                    finally:
                        with torch.no_grad():
                            for name, p in params.items():
                                p.copy_(raw[name])
        finally:
            self.model.train()
        return result

    # -- the loop ----------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        tc, p = self.config.train, self.progress
        step, status, saved = p.step, "completed", self.checkpointer.latest()
        logger = MetricsLogger(self.run_dir, step, enabled=self.dist.is_main, tensorboard=tc.tensorboard)
        bar = None
        if self.dist.is_main and tc.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=tc.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
        window = dict.fromkeys(("tokens", "flops", "padding", "positions"), 0.0)
        t0 = time.perf_counter()
        if self.validation is not None and step == 0:  # the starting point (a language model's own text loss)
            record = {"step": 0, **self.evaluate(), "eval_s": time.perf_counter() - t0}
            logger.log(record)
        window_start = time.perf_counter()
        self.model.train()
        try:
            with StopRequest() as stop:
                while step < tc.max_steps:
                    t_step = time.perf_counter()
                    out = self.train_step(step, stop_requested=stop.signal is not None)
                    p.train_time += time.perf_counter() - t_step
                    step += 1
                    for key in window:
                        window[key] += out[key]
                    if p.bad_in_a_row >= tc.max_bad_steps:
                        status = "diverged"
                        break
                    evaluate = self.validation is not None and (step % tc.eval_every == 0 or step == tc.max_steps)
                    if step % tc.log_every == 0 or step == tc.max_steps or evaluate:
                        now = time.perf_counter()
                        seconds = max(now - window_start, 1e-9)
                        record = {"step": step, **{k: out[k] for k in ("loss", "text_loss", "image_loss", "lr")},
                                  "tokens_per_s": window["tokens"] / seconds,
                                  "mfu": mfu(window["flops"], seconds, self.peak, self.dist.world_size),
                                  "padding_fraction": window["padding"] / max(window["positions"], 1.0),
                                  "grad_norm": out["grad_norm"], "skipped_steps": p.skipped_steps,
                                  "tokens_seen": p.tokens_seen, "elapsed_s": now - t0, "train_time_s": p.train_time}
                        if evaluate:
                            record.update(self.evaluate())
                            record["eval_s"] = time.perf_counter() - now
                        window = dict.fromkeys(window, 0.0)
                        window_start = time.perf_counter()  # evaluation is not training time
                        logger.log(record)
                        if bar is not None:
                            bar.set_postfix(loss=f"{out['loss']:.3f}", text=f"{out['text_loss']:.3f}",
                                            image=f"{out['image_loss']:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}",
                                            refresh=False)
                    if bar is not None:
                        bar.update(1)
                    last = step == tc.max_steps or out["stop"]
                    if step % tc.save_every == 0 or last:
                        saved = self.save(step, final=last) or saved
                    if out["stop"]:
                        status = "stopped"
                        break
        finally:
            if bar is not None:
                bar.close()
            logger.close()
        return TrainResult(status, step, self.run_dir, saved, time.perf_counter() - t0)


__all__ = ["StopRequest", "TrainResult", "Trainer", "TransfusionStep"]
