"""Train a small AutoencoderKL or VQModel on an image folder, with the loop pieces every training loop of the
project shares (checkpointer, learning-rate schedule, metrics log, progress bar: `transfusion_mot.common`).

Batches are a pure function of (seed, step) (per-epoch permutations from a seeded generator), and the only
other randomness, posterior sampling (KL) or the encoder outputs that restart dead codes (VQ), uses generators
whose states are checkpointed, as are the VQ code-usage counters. That is what makes a killed-and-resumed run
produce bit-identical weights to an uninterrupted one.

The VQ losses are computed here, not taken from diffusers' VectorQuantizer (whose loss puts beta on the
codebook term and which reports no usage): with z the encoder output and e its nearest code,
codebook = |sg(z) - e|^2, commitment = |z - sg(e)|^2, and the decoder sees z + sg(e - z) (straight-through).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from transfusion_mot.common.checkpoint import Checkpointer, ModuleWeights
from transfusion_mot.common.config import apply_overrides, from_dict, save_yaml_config, to_dict
from transfusion_mot.common.errors import ConfigError, InvalidInput, TrainingError
from transfusion_mot.common.loop import MetricsLogger, ProgressBar
from transfusion_mot.common.schedule import warmup_cosine
from transfusion_mot.data.readers import ImageFolderReader

from .autoencoder import (
    VAERunConfig,
    build_vae,
    codebook,
    compute_latent_stats,
    decode_quantized,
    load_vae_config,
    nearest_codes,
    pre_quant,
    psnr_per_image,
    set_latent_stats,
    usage_and_perplexity,
)

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "vae_config.yaml"
LOG_FILE = "train_log.jsonl"
LOSS_KEYS = ("loss", "recon", "kl", "codebook", "commitment", "perceptual")


# --------------------------------------------------------------------------------------------------
# config resolution


def resolve_config(config: str | Path | VAERunConfig | dict[str, Any],
                   overrides: list[str] | None = None) -> VAERunConfig:
    """A path (YAML), a dict, or a config object -> a validated VAERunConfig with `a.b=c` overrides."""
    if isinstance(config, (str, Path)):
        return load_vae_config(config, overrides)
    if isinstance(config, dict):
        config = from_dict(VAERunConfig, config)
    if overrides:
        data = to_dict(config)
        apply_overrides(data, overrides)
        config = from_dict(VAERunConfig, data)
    return config


# --------------------------------------------------------------------------------------------------
# perceptual loss (weights from disk only)

VGG_LAYERS = (3, 8, 15, 22)  # relu1_2, relu2_2, relu3_3, relu4_3 of torchvision's vgg16().features


class VGGPerceptual(torch.nn.Module):
    """LPIPS-style feature distance on a frozen VGG16 loaded from a local state dict. Never downloads."""

    def __init__(self, weights_path: str | Path) -> None:
        super().__init__()
        from torchvision.models import vgg16

        features = vgg16(weights=None).features[: VGG_LAYERS[-1] + 1]
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        state = {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier.")}
        state = {k: v for k, v in state.items() if int(k.split(".")[0]) <= VGG_LAYERS[-1]}
        missing, _ = features.load_state_dict(state, strict=False)
        if missing:
            raise ConfigError(f"perceptual_weights_path {weights_path}: not a torchvision VGG16 state dict "
                              f"(missing {missing[:3]})")
        self.features = features.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        x = torch.cat([a, b]).add(1).div(2).sub(self.mean).div(self.std)
        loss = x.new_zeros(())
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in VGG_LAYERS:
                fa, fb = x.chunk(2)
                fa = fa / (fa.norm(dim=1, keepdim=True) + 1e-10)
                fb = fb / (fb.norm(dim=1, keepdim=True) + 1e-10)
                loss = loss + (fa - fb).pow(2).sum(1).mean()
        return loss


def build_perceptual(cfg: VAERunConfig) -> VGGPerceptual | None:
    t = cfg.train
    if t.perceptual_weight <= 0:
        return None
    path = t.perceptual_weights_path
    if not path or not Path(path).expanduser().is_file():
        raise ConfigError(f"perceptual_weight is {t.perceptual_weight} but perceptual_weights_path "
                          f"{path!r} is not a file: save a torchvision VGG16 state dict there (weights are "
                          "never downloaded) or set perceptual_weight: 0")
    return VGGPerceptual(Path(path).expanduser())


# --------------------------------------------------------------------------------------------------
# the schedule of batches and learning rates


def batch_positions(step: int, n: int, batch_size: int, seed: int) -> Tensor:
    """Dataset positions of the batch for 0-based `step`: per-epoch permutations (generator seed + epoch),
    consecutive slices, the ragged tail dropped. A pure function, so resuming needs only the step."""
    per_epoch = max(1, n // batch_size)
    epoch, b = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[b * batch_size:(b + 1) * batch_size]


def lr_at(step: int, cfg: VAERunConfig, max_steps: int, time_fraction: float | None = None) -> float:
    """The shared warm-up + cosine schedule at 1-based `step` (decaying to min_lr_ratio * lr at max_steps, or
    over the time budget when `time_fraction` = elapsed / budget is given); "constant" stays at lr."""
    t = cfg.train
    min_lr = t.lr if t.lr_schedule == "constant" else t.lr * t.min_lr_ratio
    progress = None
    if time_fraction is not None and t.lr_schedule == "cosine":
        progress = max((step - 1 - t.warmup_steps) / max(1, max_steps - t.warmup_steps), time_fraction)
    return warmup_cosine(step - 1, t.lr, t.warmup_steps, max_steps, min_lr, progress=progress)


def reconstruction_loss(recon: Tensor, target: Tensor, kind: str) -> Tensor:
    if kind == "l1":
        return F.l1_loss(recon, target)
    if kind == "mse":
        return F.mse_loss(recon, target)
    return F.l1_loss(recon, target) + F.mse_loss(recon, target)


# --------------------------------------------------------------------------------------------------
# checkpoints: OUT/checkpoints/step_N/ = model.safetensors + trainer.pt (+ state.json), by the shared checkpointer


class CodeUsage:
    """Which codes a VQ run used: per-step counts over the last `window` steps (a ring, for codebook_usage and
    perplexity), the step each code was last used (0: not yet; for dead-code restarts), the number of restarts
    so far, and the generator that picks the encoder outputs restarted codes move to."""

    def __init__(self, size: int, window: int, seed: int) -> None:
        self.counts = torch.zeros(window, size, dtype=torch.int64)
        self.last_used = torch.zeros(size, dtype=torch.int64)
        self.restarted = 0
        self.generator = torch.Generator().manual_seed(seed)

    def record(self, step: int, codes: Tensor) -> None:
        """The codes that 1-based `step` assigned."""
        counts = torch.bincount(codes.flatten().cpu(), minlength=self.last_used.numel())
        self.counts[(step - 1) % len(self.counts)] = counts
        self.last_used[counts > 0] = step

    def stats(self) -> dict[str, float | int]:
        usage, perplexity = usage_and_perplexity(self.counts.sum(0))
        return {"codebook_usage": usage, "perplexity": perplexity, "codes_restarted": self.restarted}

    def dead(self, step: int, after: int) -> Tensor:
        """Codes unused for the last `after` steps at `step` (none when `after` is 0)."""
        if after <= 0:
            return torch.zeros(0, dtype=torch.int64)
        return torch.nonzero(step - self.last_used >= after).flatten()

    def state_dict(self) -> dict[str, Any]:
        return {"counts": self.counts.clone(), "last_used": self.last_used.clone(), "restarted": self.restarted,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["counts"].shape != self.counts.shape:
            raise TrainingError(f"checkpointed code usage has shape {tuple(state['counts'].shape)} but this run "
                                f"counts {tuple(self.counts.shape)} (usage_window, num_vq_embeddings): resume with "
                                "the settings it was started with")
        self.counts.copy_(state["counts"])
        self.last_used.copy_(state["last_used"])
        self.restarted = int(state["restarted"])
        self.generator.set_state(state["generator"])


class TrainerState:
    """trainer.pt: the optimizer, the posterior-sampling generator, the global torch RNG and, for VQ, the code
    usage (counters and the restart generator)."""

    def __init__(self, opt: torch.optim.Optimizer, noise_gen: torch.Generator, usage: CodeUsage | None = None) -> None:
        self.opt, self.noise_gen, self.usage = opt, noise_gen, usage
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        state = {"step": self.step, "optimizer": self.opt.state_dict(), "noise_generator": self.noise_gen.get_state(),
                 "torch_rng": torch.get_rng_state()}
        if self.usage is not None:
            state["code_usage"] = self.usage.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.usage is not None and "code_usage" not in state:
            raise TrainingError("the checkpoint is not of a VQ run (no code usage in trainer.pt): resume with the "
                                "config it was started with")
        self.opt.load_state_dict(state["optimizer"])
        self.noise_gen.set_state(state["noise_generator"])
        torch.set_rng_state(state["torch_rng"])
        if self.usage is not None:
            self.usage.load_state_dict(state["code_usage"])
        self.step = int(state["step"])


def checkpointer(out_dir: str | Path, vae: Any, state: TrainerState, keep: int) -> Checkpointer:
    # trainer.pt marks the checkpoints written before the shared checkpointer added state.json
    return Checkpointer(Path(out_dir) / CHECKPOINT_DIR, {"model.safetensors": ModuleWeights(vae), "trainer.pt": state},
                        keep=keep, legacy_marker="trainer.pt")


# --------------------------------------------------------------------------------------------------
# training


def _training_dataset(data_dir: str | Path, cfg: VAERunConfig) -> ImageFolderReader:
    """The training split (a row without `split` counts as train), decoded once and kept in memory."""
    dataset = ImageFolderReader(data_dir, split=cfg.train.split, size=cfg.model.sample_size, cache=True)
    if len(dataset) == 0:
        raise InvalidInput(f"{Path(data_dir) / 'metadata.jsonl'} has no rows of split {cfg.train.split!r}")
    return dataset


class VAETrainer:
    """Trains an AutoencoderKL or a VQModel (model.kind) on an image folder with the loop pieces every training
    loop of the project shares: the checkpointer (model.safetensors + trainer.pt, atomic, resumable), the
    warm-up + cosine schedule, the metrics log (train_log.jsonl) and the progress bar. A fresh run in an
    existing `out_dir` deletes its old checkpoints and log, so a later resume can never mix two runs."""

    def __init__(self, cfg: VAERunConfig, data_dir: str | Path, out_dir: str | Path, resume: bool = False,
                 progress: bool = True, device: str | torch.device = "cpu") -> None:
        t = cfg.train
        self.cfg, self.out, self.device = cfg, Path(out_dir), torch.device(device)
        self.perceptual = build_perceptual(cfg)  # fails before any work if its weights are missing
        self.dataset = _training_dataset(data_dir, cfg)
        self.out.mkdir(parents=True, exist_ok=True)
        save_yaml_config(cfg, self.out / CONFIG_FILE)
        torch.manual_seed(t.seed)
        self.vae = build_vae(cfg.model).to(self.device).train()
        if self.perceptual is not None:
            self.perceptual.to(self.device)
        self.opt = torch.optim.AdamW(self.vae.parameters(), lr=t.lr, betas=(0.9, 0.99), weight_decay=t.weight_decay)
        self.noise = torch.Generator(device=self.device).manual_seed(t.seed + 1)
        self.vq = cfg.model.is_vq
        self.usage = CodeUsage(cfg.model.num_vq_embeddings, t.usage_window, t.seed + 2) if self.vq else None
        self.state = TrainerState(self.opt, self.noise, self.usage)
        self.checkpoints = checkpointer(self.out, self.vae, self.state, t.keep_checkpoints)
        self.start = self._restore(resume)
        self.log = MetricsLogger(self.out / LOG_FILE, self.start)  # a fresh run starts an empty log
        self.bar = ProgressBar(t.max_steps, self.start, desc="vae", enabled=progress)

    def _restore(self, resume: bool) -> int:
        """The step to start from: the newest checkpoint's with `resume`, else 0 (old checkpoints removed)."""
        ckpt = self.checkpoints.latest() if resume else None
        if resume and ckpt is None:
            print(f"resume: no checkpoint in {self.out / CHECKPOINT_DIR}, starting from step 0")
        if ckpt is None:
            shutil.rmtree(self.out / CHECKPOINT_DIR, ignore_errors=True)
            return 0
        return int(self.checkpoints.load(ckpt)["step"])

    def batch(self, step: int) -> Tensor:
        """The images of 0-based `step` (a pure function of seed and step), flipped where the config says."""
        t = self.cfg.train
        x = self.dataset.batch(batch_positions(step, len(self.dataset), t.batch_size, t.seed))["image"]
        if t.hflip:
            flip = torch.rand(len(x), generator=torch.Generator().manual_seed(t.seed * 7919 + step)) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x.to(self.device)

    def train_step(self, x: Tensor, lr: float, step: int = 1) -> dict[str, Tensor]:
        """One optimizer step on images `x` at learning rate `lr`: reconstruction + KL (+ perceptual), or for VQ
        reconstruction + codebook + commitment (+ perceptual), then the code usage of 1-based `step` and the
        restart of codes unused for train.dead_code_after steps."""
        t = self.cfg.train
        for group in self.opt.param_groups:
            group["lr"] = lr
        if self.vq:
            losses, recon, vectors, codes = self._vq_losses(x)
        else:
            posterior = self.vae.encode(x).latent_dist
            z = posterior.sample(generator=self.noise)
            recon = self.vae.decode(z).sample
            losses = {"recon": reconstruction_loss(recon, x, t.recon_loss),
                      "kl": posterior.kl().mean() / z[0].numel()}  # per latent element
            losses["loss"] = losses["recon"] + t.kl_weight * losses["kl"]
        if self.perceptual is not None:
            losses["perceptual"] = self.perceptual(recon, x)
            losses["loss"] = losses["loss"] + t.perceptual_weight * losses["perceptual"]
        self.opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.vae.parameters(), t.grad_clip)
        self.opt.step()
        if self.vq:
            self.usage.record(step, codes)
            self.restart_dead_codes(step, vectors)
        return {**losses, "reconstruction": recon.detach()}

    def _vq_losses(self, x: Tensor) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor]:
        """(losses, reconstruction, encoder outputs (N, D), their codes (N,)) of a VQ forward pass: each encoder
        output z snaps to its nearest code e; the codebook loss pulls e to z, the commitment loss z to e, and
        the decoder's gradient reaches the encoder straight through the snap."""
        t = self.cfg.train
        h = pre_quant(self.vae, x)
        b, d, hh, ww = h.shape
        z = h.permute(0, 2, 3, 1).reshape(-1, d)
        codes = nearest_codes(z, codebook(self.vae))
        e = F.embedding(codes, codebook(self.vae))
        quant = (z + (e - z).detach()).view(b, hh, ww, d).permute(0, 3, 1, 2)
        recon = decode_quantized(self.vae, quant)
        losses = {"recon": reconstruction_loss(recon, x, t.recon_loss), "codebook": F.mse_loss(e, z.detach()),
                  "commitment": F.mse_loss(z, e.detach())}
        losses["loss"] = losses["recon"] + losses["codebook"] + t.commitment_weight * losses["commitment"]
        return losses, recon, z.detach(), codes

    @torch.no_grad()
    def restart_dead_codes(self, step: int, vectors: Tensor) -> int:
        """Move every code unused for train.dead_code_after steps onto a distinct encoder output of this batch
        (drawn with the checkpointed generator; with more dead codes than outputs, outputs repeat) and clear its
        optimizer moments, so it starts where the data is, as a fresh code. Returns how many moved."""
        dead = self.usage.dead(step, self.cfg.train.dead_code_after)
        if not len(dead):
            return 0
        gen, n = self.usage.generator, len(vectors)
        pick = torch.randperm(n, generator=gen)[: len(dead)] if len(dead) <= n else torch.randint(
            n, (len(dead),), generator=gen)
        book = codebook(self.vae)
        rows = dead.to(book.device)
        book[rows] = vectors[pick.to(vectors.device)].to(book.dtype)
        for moment in self.opt.state.get(book, {}).values():
            if isinstance(moment, Tensor) and moment.shape == book.shape:
                moment[rows] = 0
        self.usage.last_used[dead] = step
        self.usage.restarted += len(dead)
        return len(dead)

    def save(self, step: int) -> None:
        self.state.step = step
        self.checkpoints.save(step)

    def fit(self, time_budget_s: float | None = None, schedule_by_time: bool = False) -> dict[str, Any]:
        """Train to train.max_steps (or the time budget), then the latent statistics and the save_pretrained
        directory; returns the summary (see `train_vae`)."""
        t = self.cfg.train
        step, started, last, stopped_early = self.start, time.perf_counter(), {}, False
        with self.log, self.bar:
            while step < t.max_steps:
                if time_budget_s is not None and time.perf_counter() - started >= time_budget_s:
                    stopped_early = True
                    break
                x = self.batch(step)
                step += 1
                frac = (time.perf_counter() - started) / time_budget_s if schedule_by_time and time_budget_s else None
                lr = lr_at(step, self.cfg, t.max_steps, frac)
                out = self.train_step(x, lr, step)
                if not torch.isfinite(out["loss"]):
                    raise TrainingError(f"vae training diverged at step {step} (loss {out['loss'].item()}); lower "
                                        "train.lr or raise train.warmup_steps")
                if step % t.log_every == 0 or step == t.max_steps or step == self.start + 1:
                    with torch.no_grad():
                        psnr = float(psnr_per_image(x, out["reconstruction"]).mean())
                    last = {"step": step, **{k: out[k].item() for k in LOSS_KEYS if k in out}, "psnr": psnr,
                            **(self.usage.stats() if self.vq else {}), "lr": lr,
                            "time_s": round(time.perf_counter() - started, 3)}
                    self.log.log(last)
                    shown = {"usage": f"{last['codebook_usage']:.2f}"} if self.vq else {}
                    self.bar.update(loss=f"{last['loss']:.4f}", psnr=f"{psnr:.2f}", **shown)
                else:
                    self.bar.update()
                if step % t.save_every == 0 or step == t.max_steps:
                    self.save(step)
        if stopped_early and step > self.start and step % t.save_every:
            self.save(step)
        return self.finish(step, last, stopped_early, time.perf_counter() - started)

    def finish(self, step: int, last: dict[str, Any], stopped_early: bool, train_time: float) -> dict[str, Any]:
        """Latent scale/shift from the training data into the VAE's config (KL only: codes are never scaled), then
        save_pretrained (safetensors)."""
        self.vae.eval()
        m = self.cfg.model
        summary = {"out_dir": str(self.out), "steps": step, "resumed_from": self.start, "stopped_early": stopped_early,
                   "train_time_s": round(train_time, 2), "train_images": len(self.dataset),
                   "params": sum(p.numel() for p in self.vae.parameters()), "final": last}
        if self.vq:
            self.vae.save_pretrained(self.out, safe_serialization=True)
            return {**summary, "latent_shape": [m.latent_size, m.latent_size], "codebook_size": m.num_vq_embeddings}
        stats = compute_latent_stats(self.vae, self.dataset, n=self.cfg.train.stats_samples)
        set_latent_stats(self.vae, stats.shift_factor, stats.scaling_factor)
        self.vae.save_pretrained(self.out, safe_serialization=True)
        return {**summary, "scaling_factor": stats.scaling_factor, "shift_factor": stats.shift_factor,
                "latent_shape": [m.latent_channels, m.latent_size, m.latent_size]}


def train_vae(config_path_or_obj: str | Path | VAERunConfig | dict[str, Any], data_dir: str | Path,
              out_dir: str | Path, max_steps: int | None = None, overrides: list[str] | None = None,
              resume: bool = False, time_budget_s: float | None = None, schedule_by_time: bool = False,
              progress: bool = True, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Train an AutoencoderKL, or a VQModel for model.kind "vq" (`VAETrainer`); write `out_dir` as a
    `save_pretrained` directory (safetensors) with, for KL, the latent scale/shift computed from the training
    data, plus `train_log.jsonl`, `vae_config.yaml` and resumable `checkpoints/step_N/`. A VQ run logs
    codebook_usage and perplexity (over the last train.usage_window steps) and codes_restarted.

    `max_steps` overrides the config's; `resume=True` continues from the newest checkpoint (model,
    optimizer, step, RNG); with lr_schedule "cosine" the decay follows the max_steps in force, so resume
    with the same max_steps for bit-identical results. `time_budget_s` stops early (the benchmark's
    wall-clock budget); the LR schedule follows max_steps unless `schedule_by_time`, which decays it over
    the budget instead (the benchmark's mode; not bit-reproducible, it depends on the machine's speed).
    Returns a summary dict.
    """
    cfg = resolve_config(config_path_or_obj, overrides)
    if max_steps is not None:
        cfg.train.max_steps = int(max_steps)
        cfg.train.validate()
    trainer = VAETrainer(cfg, data_dir, out_dir, resume=resume, progress=progress, device=device)
    return trainer.fit(time_budget_s, schedule_by_time)
