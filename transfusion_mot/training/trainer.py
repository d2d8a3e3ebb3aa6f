"""The Transfusion training loop, one process or many (torchrun + FSDP2), torchtitan style: the `Trainer`
builds each of its parts from its own section of the run config, then runs a short loop.

One optimizer step: `grad_accum` micro-batches of `batch_size` rows per process (padded samples or packed
rows), L = L_LM + lambda L_diff, backward, one all-reduce of the step's statistics (losses, tokens, FLOPs,
padding, flags), gradient clipping, AdamW, EMA. A step whose loss or gradient norm is not finite is
skipped and counted; `max_bad_steps` in a row stop the run.

Everything a step consumes (data positions, mixing draws, timesteps and noise) comes from generators whose
states are checkpointed with the weights, EMA and optimizer (`transfusion_mot.run_dir`), so a resume
continues bit-for-bit where the run stopped (same device and number of processes; on another number the
data position is re-split and the random streams re-seeded). SIGTERM / Ctrl-C finish the current step,
save a checkpoint and exit cleanly.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from contextlib import closing, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..accounting import batch_train_flops
from ..batch import Batch
from ..common.compile import compile_counts, eager_stance
from ..common.distributed import DistInfo, all_reduce_sum
from ..common.errors import TrainingError
from ..common.loop import MetricsLogger, ProgressBar, StopRequest
from ..common.tensors import full_tensor
from ..common.throughput import ThroughputWindow
from ..config import RunConfig
from ..pretrained import load_lm_weights
from ..run_dir import CheckpointSaveError, RunDir, RunProgress, TrainingCheckpointer, TrainingState
from ..tokenizer import Tokenizer
from .optim import build_ema, build_optimizer, learning_rate
from .parallel import build_model
from .stream import build_training_data
from .validation import validation_summary


@dataclass
class StepStats:
    """One optimizer step, over every process: mean losses, the learning rate and gradient norm, and sums of
    what MFU and the padding fraction are measured from; `stop`: some process was asked to stop."""

    loss: float
    text_loss: float
    image_loss: float
    lr: float
    grad_norm: float
    tokens: int
    flops: float
    padding: float
    positions: float
    seconds: float  # this process's time in the step
    skipped: bool
    stop: bool


@dataclass
class TrainResult:
    status: str  # completed | stopped | diverged (max_bad_steps non-finite steps in a row)
    step: int
    run_dir: Path
    checkpoint: Path | None  # the last checkpoint saved
    wall_time_s: float = 0.0
    main: bool = True  # the main process (the others leave summary and reporting to it)
    summary: dict[str, Any] = field(default_factory=dict)  # what summary.json says (main process)


@dataclass
class PreparedRun:
    """A run ready for its trainer (`recipes.prepare.prepare_run`): where it lives, this process's place and
    device, the precision it computes in, its tokenizer, and the checkpoint it resumes from (None: a new run)."""

    run: RunDir
    dist: DistInfo
    device: torch.device
    precision: str
    tokenizer: Tokenizer
    resume_from: Path | None


class Trainer:
    """A training run of `config`, its parts built from the config's sections, on a prepared run (its
    directory, process group, device, precision and tokenizer: `recipes.prepare.prepare_run`). With
    `prepared.resume_from` it continues from that checkpoint (written by any number of processes), else the
    model starts from its initialisation (or model.init_from's weights)."""

    def __init__(self, config: RunConfig, prepared: PreparedRun) -> None:
        tc = config.train
        self.config, self.run, self.dist = config, prepared.run, prepared.dist
        self.device, self.precision, self.resumed_from = prepared.device, prepared.precision, prepared.resume_from
        run, dist, tokenizer, resume_from = self.run, self.dist, prepared.tokenizer, self.resumed_from
        torch.manual_seed(tc.seed)  # identical initial weights on every process
        self.model, self.step_module, self.accounting = build_model(config, dist, self.device, self.precision)
        if config.model.init_from and resume_from is None:  # a resumed run's weights come from its checkpoint
            load_lm_weights(self.model, config.model.init_from)
        self.optimizer = build_optimizer(self.model, config.optim, sharded=dist.distributed)
        self.ema = build_ema(self.model, config.optim)
        self.data = build_training_data(config, tokenizer, dist, self.device)
        self.validation = self.data.validation
        torch.manual_seed(tc.seed * 1_000_003 + dist.rank)
        self.noise = torch.Generator().manual_seed(tc.seed * 7_919 + dist.rank)
        self.progress = RunProgress(dist.world_size, self.data.vae_path)
        state = TrainingState(self.model, self.optimizer, self.ema, self.data.batches, self.noise, self.device,
                              self.progress)
        self.checkpointer = TrainingCheckpointer(run, state, dist, tc.keep_checkpoints, tc.seed)
        self.failed_saves = 0
        if resume_from is not None:
            self.checkpointer.load(resume_from, verify=False)  # RunDir.begin chose it by its content check
        # what the loop reports: tokens/s and MFU over each logged window, the metrics log from this step on, and
        # the progress bar (shown from the first step)
        self.window = ThroughputWindow(self.device, tc.peak_tflops, dist.world_size)
        self.logger = MetricsLogger(run.metrics_file, self.progress.step, enabled=dist.is_main,
                                    tensorboard_dir=run.tensorboard_dir if tc.tensorboard else None)
        self.bar = ProgressBar(tc.max_steps, self.progress.step, enabled=dist.is_main and tc.progress)

    def autocast(self):
        if self.precision != "bf16":
            return nullcontext()
        # RMSNorm weights stay fp32 under autocast; torch notes (once per process) that it then skips
        # its fused kernel, which is expected here
        warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    # -- the loop ----------------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        """Train to train.max_steps (or a stop request, or divergence), checkpointing on the way; the main
        process then writes the run's summary."""
        tc, p, main = self.config.train, self.progress, self.dist.is_main
        step, status, saved, t0 = p.step, "completed", self.checkpointer.latest(), time.perf_counter()
        # closing: the data's worker processes stop with the run, not whenever the trainer is dropped
        with self.logger, self.bar, StopRequest() as stop, closing(self.data.mix):
            if self.validation is not None and step == 0:  # the starting point (a language model's own text loss)
                self.logger.log({"step": 0, **self.evaluate(), "eval_s": time.perf_counter() - t0})
            self.model.train()
            while step < tc.max_steps:
                stats = self.train_step(step, stop.requested)
                step += 1
                if p.bad_in_a_row >= tc.max_bad_steps:
                    status = "diverged"
                    break
                self.log(step, stats, elapsed=time.perf_counter() - t0)
                if step % tc.save_every == 0 or step == tc.max_steps or stats.stop:
                    saved = self.save(step, final=step == tc.max_steps or stats.stop) or saved
                if stats.stop:
                    status = "stopped"
                    break
        result = TrainResult(status, step, self.run.path, saved, time.perf_counter() - t0, main)
        if main:
            result.summary = self.summary(result)
            self.run.write_summary(result.summary)
        return result

    def train_step(self, step: int, stop_requested: bool = False) -> StepStats:
        """One optimizer step. `stop_requested` (this process got SIGTERM/Ctrl-C) is shared with every process in
        the step's one all-reduce; the result's `stop` says whether any asked."""
        tc, t_step = self.config.train, time.perf_counter()
        lr = learning_rate(self.config.optim, step, tc.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        # loss, text, image (means over micro-batches); tokens, FLOPs, padding positions, positions (sums)
        sums = torch.zeros(7, dtype=torch.float64)
        for micro in range(tc.grad_accum):
            batch = next(self.data.batches)
            sums[3:] += self._batch_counts(batch)
            if self.dist.distributed:
                self.step_module.set_requires_gradient_sync(micro == tc.grad_accum - 1)
            with self.autocast():
                losses = self.step_module(batch.to(self.device), self.noise)
            (losses["loss"] / tc.grad_accum).backward()
            sums[:3] += torch.stack([losses[k].detach().float() for k in ("loss", "text_loss", "image_loss")]
                                    ).cpu().double() / tc.grad_accum
        clip = self.config.optim.grad_clip or math.inf  # 0: no clipping (the norm is still logged)
        grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)).float().cpu().item()
        # one all-reduce: mean losses over processes, totals, and whether any saw a non-finite value
        flags = torch.tensor([float(not torch.isfinite(sums[:3]).all()), float(stop_requested)], dtype=torch.float64)
        r = all_reduce_sum(torch.cat([sums, flags]), self.dist).tolist()
        bad = r[7] > 0 or not math.isfinite(grad_norm)
        if not bad:
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        p, world = self.progress, self.dist.world_size
        p.skipped_steps, p.bad_in_a_row = p.skipped_steps + bad, (p.bad_in_a_row + 1) if bad else 0
        seconds = time.perf_counter() - t_step
        p.tokens_seen += int(r[3])
        p.train_time += seconds
        stats = StepStats(r[0] / world, r[1] / world, r[2] / world, lr, grad_norm, int(r[3]), r[4], r[5], r[6],
                          seconds, bad, r[8] > 0)
        self.window.add(stats)
        return stats

    def _batch_counts(self, batch: Batch) -> torch.Tensor:
        """(tokens, training FLOPs, padding positions, positions) of one micro-batch."""
        real = batch.inputs.doc_ids >= 0
        flops = batch_train_flops(self.accounting, batch.inputs.modality, batch.inputs.doc_ids,
                                  self.config.model.modalities)
        return torch.tensor([float(real.sum()), flops, float((~real).sum()), float(real.numel())], dtype=torch.float64)

    def log(self, step: int, stats: StepStats, elapsed: float) -> None:
        """A metrics line every train.log_every steps and at the end, with held-out losses every
        train.eval_every steps (not counted as training time); the progress bar every step."""
        tc, p = self.config.train, self.progress
        evaluate = self.validation is not None and (step % tc.eval_every == 0 or step == tc.max_steps)
        if step % tc.log_every == 0 or step == tc.max_steps or evaluate:
            record = {"step": step, "loss": stats.loss, "text_loss": stats.text_loss, "image_loss": stats.image_loss,
                      "lr": stats.lr, **self.window.take(), "grad_norm": stats.grad_norm, "skipped_steps": p.skipped_steps,
                      "tokens_seen": p.tokens_seen, "elapsed_s": elapsed, "train_time_s": p.train_time}
            if evaluate:
                start = time.perf_counter()
                record.update(self.evaluate(), eval_s=time.perf_counter() - start)
            self.logger.log(record)
            self.bar.update(loss=f"{stats.loss:.3f}", text=f"{stats.text_loss:.3f}", image=f"{stats.image_loss:.3f}",
                       tok_s=f"{record['tokens_per_s']:,.0f}")
        else:
            self.bar.update()

    def evaluate(self) -> dict[str, float]:
        """Held-out losses of the current weights (and of the EMA weights with train.eval_ema)."""
        weight = self.config.model.image_loss_weight

        def loss_fn(batch: Batch, **draws: Any) -> dict[str, torch.Tensor]:
            return self.step_module(batch, None, **draws)

        self.model.eval()
        try:
            # eager even where the blocks are compiled: a few held-out batches per evaluation do not repay a
            # second (no-grad) graph, whose compile costs ~13 s on a 2-core CPU
            with self.autocast(), eager_stance():
                result = self.validation.evaluate(loss_fn, weight)
                if self.ema is not None and self.config.train.eval_ema:
                    with self.ema.swapped_in(self.model):
                        result.update({"val_ema_" + k[len("val_"):]: v
                                       for k, v in self.validation.evaluate(loss_fn, weight).items()})
        finally:
            self.model.train()
        return result

    def save(self, step: int, final: bool) -> Path | None:
        """Checkpoint `step`. A failed periodic save is a warning (training goes on, earlier checkpoints are
        intact); a failed final save is an error."""
        try:
            return self.checkpointer.save(step)
        except CheckpointSaveError as err:
            self.failed_saves += 1
            if self.dist.is_main:
                print(f"warning: {err}", file=sys.stderr)
            if final:
                raise TrainingError(f"{err}; see the warning above") from None
            return None

    def summary(self, result: TrainResult) -> dict[str, Any]:
        """summary.json: parameters and FLOPs, where and how the run trained, how it ended, held-out results."""
        acc, config, p = self.accounting, self.config, self.progress
        summary = {
            "parameters": {"total": acc["total_params"], "shared": acc["shared_params"],
                           "per_modality": acc["params_per_modality"], "active_per_token": acc["active_params_per_token"]},
            "train_flops_per_token": acc["train_flops_per_token"], "flops_seq_len": acc["flops_seq_len"],
            "model": {"untie": config.model.untie, "dim": config.model.dim, "n_layers": config.model.n_layers,
                      "init_from": config.model.init_from, "freeze": config.train.freeze,
                      "image_objective": config.model.image_objective},
            "trainable_parameters": sum(w.numel() for w in self.model.parameters() if w.requires_grad),
            "world_size": self.dist.world_size, "device": str(self.device), "precision": self.precision,
            "latent_shape": list(self.data.latent_shape), "vae": p.vae,
            "resumed_from": str(self.resumed_from) if self.resumed_from else None,
            "status": result.status, "step": result.step, "wall_time_s": result.wall_time_s,
            "train_time_s": p.train_time, "tokens_seen": p.tokens_seen, "skipped_steps": p.skipped_steps,
            "failed_saves": self.failed_saves, "data_mix": self.data.mix.counts,
            "last_checkpoint": str(result.checkpoint) if result.checkpoint else None}
        if config.train.compile:  # a recompile or fallback shows here, not only as lost time
            summary["compile"] = compile_counts()
        if self.validation is not None:
            summary["validation"] = validation_summary(self.validation, config.train.eval_every,
                                                       self.run.read_metrics())
        return summary


__all__ = ["PreparedRun", "StepStats", "TrainResult", "Trainer"]
