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
With held-out text documents (`data.text_val_path`), val_corpus_loss is their mean next-token loss per
token (documents laid out as in training: BOS text EOS, cut to the context), on the same documents each time.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..batch import Batch, Collator, Sample, patchify
from ..common.distributed import DistInfo
from ..common.errors import ConfigError
from ..config import DataConfig, RunConfig
from ..data.imageio import read_metadata
from ..data.readers import ImageFolderReader, WebDatasetReader
from ..data.streams import read_text_documents
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
                 device: torch.device | str = "cpu", documents: Sequence[Sequence[int]] = (), source: str = "") -> None:
        if not pairs:
            raise ConfigError("validation: no held-out samples")
        if batch_size < 1:
            raise ConfigError(f"validation: batch size must be positive, got {batch_size}")
        self.num_samples = len(pairs)
        self.source, self.seed = source, int(seed)  # where the pairs came from, and the draws' seed (summary.json)
        self.num_train_timesteps = objective.num_train_timesteps
        self.bucket_names = bucket_names(self.num_train_timesteps)
        generator = torch.Generator().manual_seed(int(seed))
        discrete = objective.name == "ddpm"
        timesteps = stratified_timesteps(len(pairs), self.num_train_timesteps, generator, discrete)
        patch = collator.config.patch_size
        noises = [patchify(torch.randn(latent.shape, generator=generator), patch) for latent, _ in pairs]
        captions = [encode_caption(tokenizer, text, max_text_tokens, overflow) for _, text in pairs]
        self.timesteps = timesteps  # (N,) in sample order, on the CPU
        self.batches: list[ValidationBatch] = []
        for start in range(0, len(pairs), batch_size):
            rows = range(start, min(start + batch_size, len(pairs)))
            generation = collator.collate_padded([Sample([captions[i], pairs[i][0]]) for i in rows])
            captioning = collator.collate_padded([Sample([pairs[i][0], captions[i]], image_first=True) for i in rows])
            self.batches.append(ValidationBatch(generation.to(device), timesteps[start:rows.stop].to(device),
                                                torch.cat([noises[i] for i in rows]).to(device), captioning.to(device)))
        self.num_documents = len(documents)
        self.corpus_batches = [collator.collate_padded([Sample([list(doc)]) for doc in documents[i:i + batch_size]])
                               .to(device) for i in range(0, len(documents), batch_size)]

    @torch.no_grad()
    def evaluate(self, loss_fn: LossFn, image_loss_weight: float) -> dict[str, float]:
        """{val_loss, val_text_loss, val_caption_loss, val_image_loss, val_image_loss_<bucket>...}."""
        text_nll = text_tokens = caption_nll = caption_tokens = 0.0
        mse = []
        for generation, t, noise, captioning in self.batches:
            out = loss_fn(generation, timesteps=t, noise=noise, details=True)
            text_nll += out["text_nll_sum"].item()
            text_tokens += out["text_tokens"].item()
            mse.append(out["image_mse_per_image"].float().cpu())
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
        bucket = (t_all / self.num_train_timesteps * NUM_BUCKETS).long().clamp(max=NUM_BUCKETS - 1)
        for k, name in enumerate(self.bucket_names):
            chosen = mse_all[bucket == k]
            result[f"val_image_loss_{name}"] = chosen.mean().item() if len(chosen) else float("nan")
        return result


def evenly_spaced(total: int, n: int) -> list[int]:
    """n indices spread over range(total) (all of them when n >= total): a held-out subset that does not
    depend on how the source happens to be ordered at its start."""
    if n >= total:
        return list(range(total))
    return [int(i * total / n) for i in range(n)]


def load_validation_documents(path: str | Path, n: int, tokenizer: Any, max_tokens: int) -> list[list[int]]:
    """Up to n held-out text documents (evenly spaced over the file), tokenized and cut to `max_tokens`."""
    docs = read_text_documents(path)
    return [tokenizer.encode(docs[i])[:max_tokens] for i in evenly_spaced(len(docs), n)]


def missing_held_out(data: DataConfig) -> str | None:
    """Why a data config has no held-out image-caption pairs (None when it has them): a latent cache or
    shards with no data.val_path, an image folder with no rows of data.val_split."""
    if data.kind in ("latents", "webdataset"):
        held_out = "latents" if data.kind == "latents" else "shards"
        return None if data.val_path else f"data.val_path (held-out {held_out}, --val-data) is not set"
    path = data.val_path or data.path
    if read_metadata(path, split=data.val_split):
        return None
    return f"{Path(path) / 'metadata.jsonl'} has no rows of split {data.val_split!r} (data.val_split, data.val_path)"


def load_validation_pairs(data: DataConfig, n: int, vae: Any = None, device: torch.device | str = "cpu",
                          image_size: int | None = None) -> tuple[list[tuple[Tensor, str]], str]:
    """Up to n held-out (latent (C, H, W), caption) pairs and a description of where they came from.

    data.kind "latents": the cache at data.val_path (`tmot vae encode --split val`); "folder": the rows of
    split data.val_split in data.val_path (default: data.path); "webdataset": the first n samples of the
    shards at data.val_path. Images are encoded by `vae` (posterior mean)."""
    kind = data.kind
    if kind == "latents":
        if not data.val_path:
            raise ConfigError("validation (train.eval_every > 0) needs held-out latents: set data.val_path (or "
                              "--val-data) to a cache of the val split, e.g. `tmot vae encode --split val`")
        from vae.latents import LatentDataset

        dataset = LatentDataset(data.val_path)
        items = [dataset[i] for i in evenly_spaced(len(dataset), n)]
        return [(item["latent"].float(), item["text"] or "") for item in items], str(data.val_path)
    if vae is None:
        raise ConfigError(f"validation on data.kind {kind!r} encodes images: it needs a VAE (vae.path)")
    if kind == "folder":
        path = data.val_path or data.path
        reader = ImageFolderReader(path, split=data.val_split, size=image_size)
        if len(reader) == 0:
            raise ConfigError(f"validation: {path}/metadata.jsonl has no rows with split {data.val_split!r}; "
                              "set data.val_split or data.val_path, or train.eval_every=0")
        items = [reader[i] for i in evenly_spaced(len(reader), n)]
        source = f"{path} (split {data.val_split})"
    elif kind == "webdataset":
        if not data.val_path:
            raise ConfigError("validation on WebDataset shards needs data.val_path: held-out shards (braces ok)")
        reader = WebDatasetReader(data.val_path, shuffle_buffer=0, seed=0, size=image_size)
        items = []
        for item in reader:
            items.append(item)
            if len(items) == n:
                break
        if not items:
            raise ConfigError(f"validation: no readable samples in {data.val_path}")
        source = str(data.val_path)
    else:  # pragma: no cover - DataConfig.validate rejects other kinds
        raise ConfigError(f"unknown data.kind {kind!r}")
    from vae import encode

    latents = []
    for start in range(0, len(items), 64):
        images = torch.stack([item["image"] for item in items[start:start + 64]]).to(device)
        latents.append(encode(vae, images).float().cpu())
    return [(z, item["text"] or "") for z, item in zip(torch.cat(latents), items)], source


def build_validation(config: RunConfig, tokenizer: Any, data: Any, objective: DiffusionObjective, dist: DistInfo,
                     device: torch.device) -> ValidationSet | None:
    """The held-out set of a run with train.eval_every, its draws fixed by train.eval_seed; None (said once)
    when the data has no held-out part. Every process scores all of it (identical forwards, as FSDP needs),
    so no reduction is needed. `data`: the run's `TrainingData` (latent shape, VAE, collator)."""
    tc = config.train
    if not tc.eval_every:
        return None
    missing = missing_held_out(config.data)
    if missing is not None:
        if dist.is_main:
            print(f"note: train.eval_every is {tc.eval_every} but {missing}: training without held-out losses (a "
                  "val cache: `tmot vae encode --split val`)", file=sys.stderr)
        return None
    vae = data.vae
    size = config.data.image_size or (int(vae.config.sample_size) if vae is not None else None)
    pairs, source = load_validation_pairs(config.data, tc.eval_samples, vae=vae, device=device, image_size=size)
    shapes = {tuple(latent.shape) for latent, _ in pairs}
    if shapes != {tuple(data.latent_shape)}:
        raise ConfigError(f"validation data {source}: latents of shape {sorted(shapes)}, but the training data's are "
                          f"{tuple(data.latent_shape)}; use held-out data encoded by the same VAE")
    documents = []
    if config.data.text_val_path:
        documents = load_validation_documents(config.data.text_val_path, tc.eval_samples, tokenizer,
                                              config.model.max_seq_len - 2)
        source += f"; text documents {config.data.text_val_path} ({len(documents)})"
    return ValidationSet(pairs, tokenizer, data.collator, objective, seed=tc.eval_seed, batch_size=tc.eval_batch_size,
                         max_text_tokens=config.tokenizer.max_text_tokens, overflow=config.tokenizer.overflow,
                         device=device, documents=documents, source=source)


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


__all__ = ["NUM_BUCKETS", "ValidationBatch", "ValidationSet", "bucket_names", "build_validation", "evenly_spaced",
           "load_validation_documents", "load_validation_pairs", "stratified_timesteps", "validation_summary"]
