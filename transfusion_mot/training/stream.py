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

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..batch import Batch, Collator, Sample
from ..common.distributed import DistInfo
from ..common.errors import ConfigError, InputNotFound, InvalidInput, UserError
from ..config import DataConfig, ModelConfig, RunConfig
from ..data.readers import ImageFolderReader, WebDatasetReader
from ..data.streams import (PrefetchedStream, Resplit, ShardStream, ShuffledStream, State, StreamWrapper,
                            read_text_documents)
from ..tokenizer import Tokenizer, encode_caption


class ImagePairSource(StreamWrapper):
    """Image-caption pairs as (latent (C, H, W), caption) from an item stream: a `ShuffledStream` over a
    map-style data set, a `PrefetchedStream` (the same, decoded by worker processes) or a `ShardStream`.

    With a VAE, items carry images in [-1, 1] and are encoded here in one batch (posterior mean, so the
    stream stays deterministic); without one, items carry cached latents."""

    def __init__(self, source: Any, vae: Any = None, device: torch.device | str = "cpu") -> None:
        self.source = source
        self.vae = vae
        self.device = torch.device(device)

    def __next__(self) -> tuple[torch.Tensor, str]:
        return self.take(1)[0]

    def take(self, n: int) -> list[tuple[torch.Tensor, str]]:
        items = [next(self.source) for _ in range(n)]
        texts = [item["text"] or "" for item in items]
        if self.vae is None:
            return [(item["latent"], t) for item, t in zip(items, texts)]
        from vae import encode

        images = torch.stack([item["image"] for item in items]).to(self.device, non_blocking=True)
        with torch.no_grad():
            latents = encode(self.vae, images).float().cpu()
        return list(zip(latents, texts))


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
    the mix they are drawn from, the latents' shape, the VAE they belong to (its path; the model itself when
    images are encoded on the fly) and the collator that lays them out."""

    batches: PaddedBatches | PackedBatches
    mix: TrainingStream
    latent_shape: tuple[int, int, int]
    vae_path: str | None
    vae: Any
    collator: Collator


def resolve_data_kind(data: DataConfig) -> None:
    """data.kind "auto" becomes what data.path holds: a latent cache (index.json), an image folder
    (metadata.jsonl) or WebDataset shards (.tar, braces allowed)."""
    if data.kind != "auto" or not data.path:
        return
    from vae.latents import INDEX_FILE

    path = Path(data.path)
    if (path / INDEX_FILE).is_file():
        data.kind = "latents"
    elif (path / "metadata.jsonl").is_file():
        data.kind = "folder"
    elif ".tar" in data.path:
        data.kind = "webdataset"
    elif not path.exists():
        raise InputNotFound(f"data.path {data.path}: not found (expected a latent cache, an image folder or .tar "
                            "shards)")
    else:
        raise UserError(f"data.path {data.path}: neither a latent cache ({INDEX_FILE}), an image folder "
                        "(metadata.jsonl) nor .tar shards")


def build_training_data(config: RunConfig, tokenizer: Tokenizer, dist: DistInfo, device: torch.device) -> TrainingData:
    """This process's share of the data config's samples, mixed and collated as the config says."""
    data, seed = config.data, config.train.seed
    if not data.path:
        raise ConfigError("data.path is not set: pass --data (a latent cache, image folder or shard pattern) "
                          "or set data.builtin: shapes")
    resolve_data_kind(data)
    pairs, latent_shape, vae_path = _image_pairs(config, dist, device)
    text_stream = None
    if data.text_only_path and data.text_only_ratio > 0:
        docs = read_text_documents(data.text_only_path)
        if len(docs) < dist.world_size:
            raise InvalidInput(f"{data.text_only_path}: {len(docs)} documents cannot be shared by {dist.world_size} "
                               "processes")
        # each process reads its own share of the documents (an epoch covers the corpus once over all ranks)
        text_stream = ShuffledStream(docs, seed=seed + 7919, rank=dist.rank, world_size=dist.world_size)
    budget = data.token_budget or config.model.max_seq_len
    mix = TrainingStream(pairs, tokenizer, seed=seed, rank=dist.rank, image_first_ratio=data.image_first_ratio,
                         caption_dropout=data.caption_dropout, text_stream=text_stream,
                         text_only_ratio=data.text_only_ratio, max_text_tokens=config.tokenizer.max_text_tokens,
                         overflow=config.tokenizer.overflow, max_doc_tokens=budget - 2)  # BOS and EOS
    check_latent_shape(config.model, latent_shape)
    collator = Collator(config.model, tokenizer.specials, max_len=config.model.max_seq_len)
    rows = config.train.batch_size
    batches = (PackedBatches(mix, collator, rows, budget) if data.packing else PaddedBatches(mix, collator, rows))
    return TrainingData(batches, mix, latent_shape, vae_path, pairs.vae, collator)


def _image_pairs(config: RunConfig, dist: DistInfo, device: torch.device
                 ) -> tuple[ImagePairSource, tuple[int, int, int], str | None]:
    """(this process's pairs, the latent shape, the VAE path the latents belong to)."""
    from vae import load_vae
    from vae.latents import LatentDataset

    data, seed, rank, world = config.data, config.train.seed, dist.rank, dist.world_size
    if data.kind == "latents":
        dataset = LatentDataset(data.path)
        stream = ShuffledStream(dataset, seed=seed, rank=rank, world_size=world, drop_last=True)
        return ImagePairSource(stream), tuple(dataset.latent_shape), config.vae.path or dataset.info.get("vae")
    vae_path = config.vae.path
    if not vae_path:
        raise ConfigError(f"data.kind {data.kind!r} encodes images on the fly: set vae.path (or --vae)")
    vae_model = load_vae(vae_path, device=device)
    vae_model.requires_grad_(False).eval()
    size = data.image_size or int(vae_model.config.sample_size)
    if data.kind == "folder":
        items = ShuffledStream(ImageFolderReader(data.path, split=data.split, size=size), seed=seed, rank=rank,
                               world_size=world, drop_last=True)
        if data.num_workers:
            items = PrefetchedStream(items, data.num_workers, data.prefetch_factor)
    else:
        reader = WebDatasetReader(data.path, shuffle_buffer=data.shuffle_buffer, seed=seed, rank=rank,
                                  world_size=world, size=size)
        items = ShardStream(reader, data.num_workers, data.prefetch_factor)
    factor = 2 ** (len(vae_model.config.block_out_channels) - 1)
    latent_shape = (int(vae_model.config.latent_channels), size // factor, size // factor)
    return ImagePairSource(items, vae=vae_model, device=device), latent_shape, vae_path


def check_latent_shape(model_config: ModelConfig, latent_shape: tuple[int, ...]) -> None:
    """ConfigError when the data's latents do not fit the model (channels, patch size, context)."""
    c, h, w = latent_shape
    m = model_config
    if c != m.latent_channels:
        raise ConfigError(f"the data's latents have {c} channels but model.latent_channels is {m.latent_channels}")
    if h % m.patch_size or w % m.patch_size:
        raise ConfigError(f"latents {h}x{w} are not divisible by model.patch_size {m.patch_size}")
    tokens = (h // m.patch_size) * (w // m.patch_size)
    if tokens + 4 > m.max_seq_len:  # BOS, BOI, EOI, EOS
        raise ConfigError(f"latents {h}x{w} make {tokens} image tokens (patch_size {m.patch_size}); with the special "
                          f"tokens that leaves no room for a caption in model.max_seq_len {m.max_seq_len}")
