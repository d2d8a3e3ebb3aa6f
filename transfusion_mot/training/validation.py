"""Held-out losses on fixed draws, so that every evaluation of every run does identical work.

A training loss is measured on fresh data with fresh timesteps and noise at every step: too noisy to
compare two runs, and blind to over-fitting. Here a fixed set of held-out image-caption pairs is scored
with draws fixed once: timesteps stratified over [0, T) (equal numbers in each quarter) and one noise
tensor per image, from a generator seeded by `train.eval_seed`, not by the training seed. The draws are
made per sample, in sample order, on the latent before patchifying, so they do not depend on the batch
size, the patch size, the model or the number of processes: two runs evaluated on the same samples are
compared on exactly the same work.

Each sample is scored in both of Transfusion's layouts:
  generation   BOS caption BOI noisy image EOI EOS  ->  val_image_loss (and per timestep quarter),
                                                        val_text_loss (the caption as language modelling)
  captioning   BOS BOI clean image EOI caption EOS  ->  val_caption_loss (text given the image, t = 0)
val_loss = val_text_loss + lambda * val_image_loss, the training loss's formula on the generation layout.
With image tokens (Chameleon) there are no draws: val_image_loss is the mean next-code NLL per image (nats
per code), and no timestep quarters are reported.
With held-out text documents (`data.text_val_path`), val_corpus_loss is their mean next-token loss per
token (documents laid out as in training: BOS text EOS, cut to the context), on the same documents each time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..batch import Batch, Collator, Sample, patchify
from ..common.errors import ConfigError
from ..config import RunConfig
from ..diffusion import DiffusionObjective
from ..tokenizer import encode_caption

NUM_BUCKETS = 4  # timestep quarters reported separately
LossFn = Callable[..., dict[str, Tensor]]  # (batch, timesteps=, noise=, details=True) -> transfusion_loss dict


def stratified_timesteps(n: int, num_train_timesteps: int, generator: torch.Generator, discrete: bool) -> Tensor:
    """n timesteps in [0, T): sample i lies in the i-th of n equal strata, then the strata are shuffled,
    so every quarter of [0, T) gets n/4 samples (to within one) whatever n is."""
    t = (torch.arange(n, dtype=torch.float64) + torch.rand(n, generator=generator, dtype=torch.float64)) / n
    t = t[torch.randperm(n, generator=generator)] * num_train_timesteps
    return t.floor().clamp(max=num_train_timesteps - 1).float() if discrete else t.float()


def bucket_names(num_train_timesteps: int) -> list[str]:
    step = num_train_timesteps / NUM_BUCKETS
    return [f"t{round(i * step)}-{round((i + 1) * step)}" for i in range(NUM_BUCKETS)]


class ValidationBatch(NamedTuple):
    generation: Batch  # BOS caption BOI image EOI EOS
    timesteps: Tensor  # (I,) on the model's device
    noise: Tensor  # (P, patch_dim) on the model's device
    captioning: Batch  # BOS BOI image EOI caption EOS


class ValidationSet:
    """Held-out pairs laid out, with their draws, once; `evaluate` runs the model over them."""

    def __init__(self, pairs: Sequence[tuple[Tensor, str]], tokenizer: Any, collator: Collator,
                 objective: DiffusionObjective, *, seed: int, batch_size: int = 64,
                 max_text_tokens: int | None = None, overflow: str = "error",
                 device: torch.device | str = "cpu", documents: Sequence[str] = (), max_document_tokens: int | None = None,
                 source: str = "") -> None:
        if not pairs:
            raise ConfigError("validation: no held-out samples")
        if batch_size < 1:
            raise ConfigError(f"validation: batch size must be positive, got {batch_size}")
        self.num_samples = len(pairs)
        self.source, self.seed = source, int(seed)  # where the pairs came from, and the draws' seed (summary.json)
        self.num_train_timesteps = objective.num_train_timesteps
        self.bucket_names = [] if collator.config.image_tokens else bucket_names(self.num_train_timesteps)
        generator = torch.Generator().manual_seed(int(seed))
        discrete = objective.name == "ddpm"
        timesteps = stratified_timesteps(len(pairs), self.num_train_timesteps, generator, discrete)
        captions = [encode_caption(tokenizer, text, max_text_tokens, overflow) for _, text in pairs]
        docs = [tokenizer.encode(text)[:max_document_tokens] for text in documents]
        patch, tokens = collator.config.patch_size, collator.config.image_tokens
        self.image_tokens = tokens
        empty = torch.zeros(0, collator.config.patch_dim)
        noises = [empty if tokens else patchify(torch.randn(latent.shape, generator=generator), patch)
                  for latent, _ in pairs]
        self.timesteps = timesteps  # (N,) in sample order, on the CPU
        self.batches: list[ValidationBatch] = []
        for start in range(0, len(pairs), batch_size):
            rows = range(start, min(start + batch_size, len(pairs)))
            generation = collator.collate_padded([Sample([captions[i], pairs[i][0]]) for i in rows])
            captioning = collator.collate_padded([Sample([pairs[i][0], captions[i]], image_first=True) for i in rows])
            self.batches.append(ValidationBatch(generation.to(device), timesteps[start:rows.stop].to(device),
                                                torch.cat([noises[i] for i in rows]).to(device), captioning.to(device)))
        self.num_documents = len(docs)
        self.corpus_batches = [collator.collate_padded([Sample([doc]) for doc in docs[i:i + batch_size]]).to(device)
                               for i in range(0, len(docs), batch_size)]

    @classmethod
    def from_held_out(cls, items: Sequence[dict[str, Any]], where: str, documents: Sequence[str], config: RunConfig,
                      tokenizer: Any, collator: Collator, objective: DiffusionObjective,
                      encode: Callable[[Tensor], Tensor] | None, latent_shape: tuple[int, ...],
                      device: torch.device) -> ValidationSet:
        """The held-out set of a run: `items` (cached latents, or images that `encode` turns into latents as
        it does the training images) and text `documents`, drawn with train.eval_seed, laid out by the run's
        collator; held-out latents of another shape than the training data's are a ConfigError."""
        if encode is None:
            latents = [item["latent"] for item in items]
        else:
            latents = [z for start in range(0, len(items), 64)
                       for z in encode(torch.stack([it["image"] for it in items[start:start + 64]])).cpu()]
        latents = [z if config.model.image_tokens else z.float() for z in latents]
        shapes = {tuple(z.shape) for z in latents}
        if shapes != {tuple(latent_shape)}:
            raise ConfigError(f"validation data {where}: latents of shape {sorted(shapes)}, but the training data's "
                              f"are {tuple(latent_shape)}; use held-out data encoded by the same VAE")
        if documents:
            where += f"; text documents {config.data.text_val_path} ({len(documents)})"
        tc = config.train
        return cls([(z, item["text"] or "") for z, item in zip(latents, items)], tokenizer, collator, objective,
                   seed=tc.eval_seed, batch_size=tc.eval_batch_size, max_text_tokens=config.tokenizer.max_text_tokens,
                   overflow=config.tokenizer.overflow, device=device, documents=documents,
                   max_document_tokens=config.model.max_seq_len - 2, source=where)

    @torch.no_grad()
    def evaluate(self, loss_fn: LossFn, image_loss_weight: float) -> dict[str, float]:
        """{val_loss, val_text_loss, val_caption_loss, val_image_loss, val_image_loss_<bucket>...}."""
        text_nll = text_tokens = caption_nll = caption_tokens = 0.0
        mse = []
        for generation, t, noise, captioning in self.batches:
            out = loss_fn(generation, timesteps=t, noise=noise, details=True)
            text_nll += out["text_nll_sum"].item()
            text_tokens += out["text_tokens"].item()
            mse.append(out["image_nll_per_image" if self.image_tokens else "image_mse_per_image"].float().cpu())
            clean = torch.zeros(captioning.num_images, device=t.device)
            out = loss_fn(captioning, timesteps=clean, noise=torch.zeros_like(captioning.inputs.patches), details=True)
            caption_nll += out["text_nll_sum"].item()
            caption_tokens += out["text_tokens"].item()
        mse_all, t_all = torch.cat(mse).double(), self.timesteps
        result = {"val_text_loss": text_nll / max(text_tokens, 1), "val_caption_loss": caption_nll / max(caption_tokens, 1),
                  "val_image_loss": mse_all.mean().item()}
        result["val_loss"] = result["val_text_loss"] + image_loss_weight * result["val_image_loss"]
        if self.corpus_batches:
            nll = tokens = 0.0
            for batch in self.corpus_batches:
                none = batch.inputs.patches.new_zeros(0)
                out = loss_fn(batch, timesteps=none, noise=batch.inputs.patches, details=True)
                nll += out["text_nll_sum"].item()
                tokens += out["text_tokens"].item()
            result["val_corpus_loss"] = nll / max(tokens, 1)
        if self.image_tokens:  # no timesteps
            return result
        bucket = (t_all / self.num_train_timesteps * NUM_BUCKETS).long().clamp(max=NUM_BUCKETS - 1)
        for k, name in enumerate(self.bucket_names):
            chosen = mse_all[bucket == k]
            result[f"val_image_loss_{name}"] = chosen.mean().item() if len(chosen) else float("nan")
        return result


def validation_summary(valset: ValidationSet, every: int, records: list[dict[str, Any]]) -> dict[str, Any]:
    """summary.json's held-out part: where the set came from, the last evaluation and the best image loss of
    the whole run (`records`: metrics.jsonl, so a resumed run includes evaluations from before the resume)."""
    evals = [{k: v for k, v in r.items() if k == "step" or k.startswith("val_")} for r in records
             if "val_image_loss" in r]
    best = min(evals, key=lambda r: r["val_image_loss"]) if evals else None
    summary = {"source": valset.source, "samples": valset.num_samples, "draw_seed": valset.seed, "every": every,
               "timestep_buckets": valset.bucket_names, "evaluations": len(evals),
               "final": evals[-1] if evals else None,
               "best_image_loss": {"step": best["step"], "val_image_loss": best["val_image_loss"]} if best else None}
    corpus = [r for r in evals if "val_corpus_loss" in r]
    if corpus:  # held-out text documents: loss per token and perplexity before training and at the end
        first, last = corpus[0], corpus[-1]
        summary["corpus"] = {name: {"step": r["step"], "val_corpus_loss": r["val_corpus_loss"],
                                    "perplexity": math.exp(r["val_corpus_loss"])}
                             for name, r in (("first", first), ("final", last))}
    return summary


__all__ = ["NUM_BUCKETS", "ValidationBatch", "ValidationSet", "bucket_names", "stratified_timesteps",
           "validation_summary"]
