"""This process's training micro-batches: image-caption pairs (from a latent cache, or images encoded on the
fly) mixed into Transfusion's directions, plus an optional text-only stream, collated into padded or packed
rows. Every stage is a `transfusion_mot.data.streams.ResumableStream`.

Per sample slot, one seeded draw decides (Transfusion's recipe):
  - text-only document, with probability `text_only_ratio` (LM loss only);
  - otherwise an image-caption pair, image-first (captioning) with probability `image_first_ratio`,
    else caption-first (generation) with the caption dropped (empty text) with probability
    `caption_dropout`, which is what classifier-free guidance samples from.
All randomness comes from one generator seeded by (seed, rank), and every source's position is in
`state_dict()`, so a resumed run sees exactly the samples the uninterrupted run would have seen.
`build_training_data` makes what a run config's data section describes (latent cache, image folder or shards).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch

from ..batch import Batch, Collator, Sample
from ..common.distributed import DistInfo
from ..common.errors import ConfigError, InvalidInput
from ..config import RunConfig, check_image_data
from ..data.sources import DataSource, open_source
from ..data.streams import (
    ImagePairSource,
    Resplit,
    ShuffledStream,
    State,
    StreamWrapper,
    TextDocuments,
    held_out_documents,
)
from ..diffusion import make_objective
from ..tokenizer import Tokenizer, encode_caption
from .validation import ValidationSet


class TrainingStream:
    """Draws `Sample`s for training (see module docstring); `next_samples(n)` draws n of them."""

    def __init__(self, pairs: ImagePairSource, tokenizer: Tokenizer, *, seed: int, rank: int = 0,
                 image_first_ratio: float = 0.2, caption_dropout: float = 0.1, text_stream: Any = None,
                 text_only_ratio: float = 0.0, max_text_tokens: int | None = None, overflow: str = "error",
                 max_doc_tokens: int | None = None) -> None:
        self.pairs = pairs
        self.tokenizer = tokenizer
        self.image_first_ratio = image_first_ratio
        self.caption_dropout = caption_dropout
        self.text_stream = text_stream
        self.text_only_ratio = text_only_ratio if text_stream is not None else 0.0
        self.max_text_tokens = max_text_tokens
        self.overflow = overflow
        self.max_doc_tokens = max_doc_tokens  # text-only documents are cut to fit the context
        self.rank = rank
        self.mix = torch.Generator().manual_seed(int(seed) * 1_000_003 + rank)
        self.counts = {"caption_first": 0, "caption_dropped": 0, "image_first": 0, "text_only": 0}

    def __iter__(self) -> TrainingStream:
        return self

    def __next__(self) -> Sample:
        return self.next_samples(1)[0]

    def next_samples(self, n: int) -> list[Sample]:
        draws = torch.rand(n, 3, generator=self.mix)  # (text-only?, image-first?, drop caption?) per slot
        kinds = []
        for u_text, u_first, u_drop in draws.tolist():
            if u_text < self.text_only_ratio:
                kinds.append("text_only")
            elif u_first < self.image_first_ratio:
                kinds.append("image_first")
            elif u_drop < self.caption_dropout:
                kinds.append("caption_dropped")
            else:
                kinds.append("caption_first")
        n_pairs = sum(k != "text_only" for k in kinds)
        pairs = iter(self.pairs.take(n_pairs)) if n_pairs else iter(())
        samples = []
        for kind in kinds:
            self.counts[kind] += 1
            if kind == "text_only":
                ids = self.tokenizer.encode(next(self.text_stream))
                if self.max_doc_tokens is not None:
                    ids = ids[: self.max_doc_tokens]
                samples.append(Sample([ids], image_first=False))
                continue
            latent, text = next(pairs)
            if kind == "caption_dropped":
                samples.append(Sample([latent], image_first=False))
                continue
            ids = encode_caption(self.tokenizer, text, self.max_text_tokens, self.overflow)
            if kind == "image_first":
                samples.append(Sample([latent, ids], image_first=True))
            else:
                samples.append(Sample([ids, latent], image_first=False))
        return samples

    def close(self) -> None:
        """Stop the sources' worker processes (a run's end); drawing again restarts them where they were."""
        for stream in (self.pairs, self.text_stream):
            if isinstance(stream, StreamWrapper):
                stream.close()

    def state_dict(self) -> State:
        state = {"mix": self.mix.get_state(), "pairs": self.pairs.state_dict(), "counts": dict(self.counts)}
        if self.text_stream is not None:
            state["text"] = self.text_stream.state_dict()
        return state

    def load_state_dict(self, state: State) -> None:
        self.mix.set_state(state["mix"])
        self.pairs.load_state_dict(state["pairs"])
        self.counts = dict(state["counts"])
        if self.text_stream is not None:
            self.text_stream.load_state_dict(state["text"])

    def load_resplit(self, states: list[State], resplit: Resplit) -> None:
        """Continue from the states of all the processes of a run with another number of them; the mixing draws
        restart from `resplit.seed`; a process carries on the counts of the old process of its rank."""
        self.mix.manual_seed(resplit.seed)
        self.pairs.load_resplit([st["pairs"] for st in states], resplit)
        if self.text_stream is not None:
            self.text_stream.load_resplit([st["text"] for st in states], resplit)
        old = states[self.rank]["counts"] if self.rank < len(states) else {}
        self.counts = {k: int(old.get(k, 0)) for k in self.counts}


class PaddedBatches(StreamWrapper):
    """`rows` samples per micro-batch, one per row, padded to the longest (`data.packing: false`)."""

    def __init__(self, source: TrainingStream, collator: Collator, rows: int) -> None:
        self.source, self.collator, self.rows = source, collator, rows

    def __next__(self) -> Batch:
        return self.collator.collate_padded(self.source.next_samples(self.rows))


class PackedBatches:
    """Micro-batches of exactly `rows` rows of `budget` tokens, each row filled with as many samples as fit
    (`data.packing: true`; document masks keep the samples apart).

    Samples are drawn `draw` at a time and placed first-fit in draw order; the first one that fits no row
    ends the micro-batch and opens the next, so no sample is dropped or reordered across batches. Drawn
    samples not yet placed are part of the state, so a resumed run packs exactly the same rows."""

    def __init__(self, source: TrainingStream, collator: Collator, rows: int, budget: int, draw: int = 16) -> None:
        self.source, self.collator, self.rows, self.budget, self.draw = source, collator, rows, budget, draw
        self.pending: list[Sample] = []

    def __iter__(self) -> PackedBatches:
        return self

    def __next__(self) -> Batch:
        used = [0] * self.rows
        chosen: list[Sample] = []
        while True:
            if not self.pending:
                self.pending = self.source.next_samples(self.draw)
            n = self.collator.layout_length(self.pending[0])
            if n > self.budget:
                raise InvalidInput(f"a sample of {n} tokens (with special tokens and image patches) does not fit "
                                   f"data.token_budget {self.budget}")
            row = next((r for r in range(self.rows) if used[r] + n <= self.budget), None)
            if row is None:
                break
            used[row] += n
            chosen.append(self.pending.pop(0))
        # collate_packed places first-fit in the same order, so it rebuilds exactly these rows
        return self.collator.collate_packed(chosen, self.budget)

    def state_dict(self) -> State:
        pending = [{"segments": list(s.segments), "image_first": s.image_first} for s in self.pending]
        return {**self.source.state_dict(), "pending": pending}

    def load_state_dict(self, state: State) -> None:
        state = dict(state)
        self.pending = [Sample(list(p["segments"]), p["image_first"]) for p in state.pop("pending", [])]
        self.source.load_state_dict(state)

    def load_resplit(self, states: list[State], resplit: Resplit) -> None:
        """As `TrainingStream.load_resplit`; the old ranks' drawn but unplaced samples (less than a row each)
        are not carried over."""
        self.pending = []
        self.source.load_resplit([{k: v for k, v in st.items() if k != "pending"} for st in states], resplit)


@dataclass
class TrainingData:
    """What a run trains on, for this process: its micro-batches (the `ResumableStream` its checkpoint keeps),
    the mix they are drawn from, the source of its data, the latents' shape, the VAE they belong to, how images become latents on the
    fly (None: the data are latents already) and at what size, the collator that lays them out, and the
    held-out set (None without one)."""

    batches: PaddedBatches | PackedBatches
    mix: TrainingStream
    source: DataSource
    latent_shape: tuple[int, ...]  # latents (C, h, w) or a code grid (h, w)
    vae_path: str | None
    encode: Callable[[torch.Tensor], torch.Tensor] | None
    image_size: int | None
    collator: Collator
    validation: ValidationSet | None = None


def build_training_data(config: RunConfig, tokenizer: Tokenizer, dist: DistInfo, device: torch.device) -> TrainingData:
    """This process's share of the data config's samples, mixed and collated as the config says, and with
    train.eval_every the held-out set (every process scores all of it: identical forwards, as FSDP needs; None,
    said once, when the data has none). Built from the bottom up: the VAE that encodes images on the fly
    (unless they come as latents), the data source, the items, then the mix, the rows and the held-out set."""
    from vae import codebook_size, image_shape, load_vae

    data, tc = config.data, config.train
    objective = make_objective(config.model)
    collator = Collator(config.model, tokenizer.specials, max_len=config.model.max_seq_len)
    source = open_source(data)
    vae, size, latent_shape = None, None, getattr(source, "latent_shape", None)
    codebook = getattr(source, "codebook_size", None)
    if source.encodes_images:
        if not config.vae.path:
            raise ConfigError(f"data.kind {source.kind!r} encodes images on the fly: set vae.path (or --vae)")
        vae = load_vae(config.vae.path, device=device).requires_grad_(False).eval()
        size = data.image_size or int(vae.config.sample_size)
        latent_shape, codebook = image_shape(vae, size), codebook_size(vae)
    encode = None if vae is None else partial(_encode_on, vae, device)
    pairs = ImagePairSource(source.items(tc.seed, dist.rank, dist.world_size, size), encode=encode)
    missing = source.missing_held_out() if tc.eval_every else "train.eval_every is 0"
    if tc.eval_every and missing is not None and dist.is_main:
        print(f"note: train.eval_every is {tc.eval_every} but {missing}: training without held-out losses (a val "
              "cache: `tmot vae encode --split val`)", file=sys.stderr)
    held_out = source.held_out(tc.eval_samples, size) if missing is None else None
    documents = held_out_documents(data.text_val_path, tc.eval_samples) if held_out and data.text_val_path else []
    text_stream = None
    if data.text_only_path and data.text_only_ratio > 0:
        # each process reads its own share of the documents (an epoch covers the corpus once over all ranks)
        text_stream = ShuffledStream(TextDocuments(data.text_only_path), seed=tc.seed + 7919, rank=dist.rank,
                                     world_size=dist.world_size)
    budget = data.token_budget or config.model.max_seq_len
    mix = TrainingStream(pairs, tokenizer, seed=tc.seed, rank=dist.rank, image_first_ratio=data.image_first_ratio,
                         caption_dropout=data.caption_dropout, text_stream=text_stream,
                         text_only_ratio=data.text_only_ratio, max_text_tokens=config.tokenizer.max_text_tokens,
                         overflow=config.tokenizer.overflow, max_doc_tokens=budget - 2)  # BOS and EOS
    rows = tc.batch_size
    batches = PackedBatches(mix, collator, rows, budget) if data.packing else PaddedBatches(mix, collator, rows)
    check_image_data(config.model, latent_shape, codebook, f"data.path {data.path}" + (
        f" (encoded by vae.path {config.vae.path})" if source.encodes_images else ""))
    validation = None if held_out is None else ValidationSet.from_held_out(
        *held_out, documents, config, tokenizer, collator, objective, encode, latent_shape, device)
    return TrainingData(batches, mix, source, latent_shape, config.vae.path or getattr(source, "vae", None), encode,
                        size, collator, validation)


def _encode_on(vae: Any, device: torch.device, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> the VAE's latents (posterior mean), on the VAE's device."""
    from vae.autoencoder import encode

    return encode(vae, images.to(device, non_blocking=True))
