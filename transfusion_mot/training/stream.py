"""The training sample stream: image-caption pairs (from a latent cache, or images encoded on the fly)
mixed into Transfusion's directions, plus an optional text-only stream.

Per sample slot, one seeded draw decides (Transfusion's recipe):
  - text-only document, with probability `text_only_ratio` (LM loss only);
  - otherwise an image-caption pair, image-first (captioning) with probability `image_first_ratio`,
    else caption-first (generation) with the caption dropped (empty text) with probability
    `caption_dropout`, which is what classifier-free guidance samples from.
All randomness comes from one generator seeded by (seed, rank), and every source's position is in
`state_dict()`, so a resumed run sees exactly the samples the uninterrupted run would have seen.
`build_stream` makes the stream a run config describes (latent cache, image folder or shards).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..batch import Batch, Collator, Sample
from ..common.errors import ConfigError, InvalidInput
from ..common.files import read_texts
from ..data.readers import ImageFolderReader, WebDatasetReader
from ..tokenizer import encode_caption


def read_text_documents(path: str | Path) -> list[str]:
    """A text-only corpus: .jsonl with a "text" field per line, or plain text with one document per line."""
    docs = read_texts(path, ("text",), "text-only corpus")
    if not docs:
        raise InvalidInput(f"{path}: no documents (empty file)")
    return docs


class PrefetchedItems:
    """A map-style dataset's items in a `LatentStream`'s order, decoded ahead of use by DataLoader worker
    processes (`num_workers`, each `prefetch_factor` items ahead), delivered in order.

    The main process keeps `order` in step with what it has delivered (the workers read ahead of it), so
    `state_dict()` resumes at the exact next item; loading a state restarts the workers there."""

    def __init__(self, order: Any, num_workers: int, prefetch_factor: int = 2) -> None:
        self.order, self.num_workers, self.prefetch_factor = order, num_workers, prefetch_factor
        self._iter = None

    def _indices(self):
        from vae.latents import LatentStream

        o = self.order
        ahead = LatentStream(o.dataset, seed=o.seed, rank=o.rank, world_size=o.world_size, shuffle=o.shuffle,
                             drop_last=o.drop_last)
        ahead.load_state_dict(o.state_dict())
        while True:
            yield ahead.next_index()

    def __iter__(self) -> PrefetchedItems:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._iter is None:
            from torch.utils.data import DataLoader

            self._iter = iter(DataLoader(self.order.dataset, batch_size=None, sampler=self._indices(),
                                         num_workers=self.num_workers, prefetch_factor=self.prefetch_factor))
        item = next(self._iter)
        self.order.next_index()  # the delivered item's position
        return item

    def close(self) -> None:
        self._iter = None  # the DataLoader iterator shuts its workers down when collected

    def state_dict(self) -> dict[str, Any]:
        return self.order.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.close()
        self.order.load_state_dict(state)

    def load_resplit(self, states: list[dict[str, Any]], old_world_size: int) -> None:
        self.close()
        self.order.load_resplit(states, old_world_size)


class ShardItems:
    """A WebDataset reader's samples, epoch after epoch; with `num_workers` > 0 they are read and decoded by
    DataLoader worker processes (the reader's own tracking keeps its state exact at the delivered sample)."""

    def __init__(self, reader: WebDatasetReader, num_workers: int = 0, prefetch_factor: int = 2) -> None:
        self.reader, self.num_workers, self.prefetch_factor = reader, num_workers, prefetch_factor
        self._iter = None

    def __iter__(self) -> ShardItems:
        return self

    def __next__(self) -> dict[str, Any]:
        for _ in range(2):  # one iter() is (the rest of) one epoch; an empty epoch means no usable sample
            if self._iter is None:
                extra = {"prefetch_factor": self.prefetch_factor} if self.num_workers else {}
                self._iter = iter(self.reader.loader(batch_size=None, num_workers=self.num_workers, **extra))
            try:
                return next(self._iter)
            except StopIteration:
                self._iter = None
        raise InvalidInput(f"{self.reader.urls[0]}...: a whole epoch of the shards gave no readable sample")

    def state_dict(self) -> dict[str, Any]:
        return self.reader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._iter = None
        self.reader.load_state_dict(state)

    def load_resplit(self, states: list[dict[str, Any]], old_world_size: int) -> None:
        self._iter = None
        self.reader.load_resplit(states, old_world_size)


class ImagePairSource:
    """Image-caption pairs as (latent (C, H, W), caption) from an item stream: a `LatentStream` over a
    map-style dataset, `PrefetchedItems` (the same, decoded by worker processes) or `ShardItems`.

    With a VAE, items carry images in [-1, 1] and are encoded here in one batch (posterior mean, so the
    stream stays deterministic); without one, items carry cached latents."""

    def __init__(self, stream: Any, vae: Any = None, device: torch.device | str = "cpu") -> None:
        self.stream = stream
        self.vae = vae
        self.device = torch.device(device)

    def take(self, n: int) -> list[tuple[torch.Tensor, str]]:
        items = [next(self.stream) for _ in range(n)]
        texts = [item["text"] or "" for item in items]
        if self.vae is None:
            return [(item["latent"], t) for item, t in zip(items, texts)]
        from vae import encode

        images = torch.stack([item["image"] for item in items]).to(self.device, non_blocking=True)
        with torch.no_grad():
            latents = encode(self.vae, images).float().cpu()
        return list(zip(latents, texts))

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)

    def load_resplit(self, states: list[dict[str, Any]], old_world_size: int) -> None:
        self.stream.load_resplit(states, old_world_size)


class TrainingStream:
    """Draws `Sample`s for training (see module docstring)."""

    def __init__(self, pairs: ImagePairSource, tokenizer: Any, *, seed: int, rank: int = 0,
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

    def state_dict(self) -> dict[str, Any]:
        state = {"mix": self.mix.get_state(), "pairs": self.pairs.state_dict(), "counts": dict(self.counts)}
        if self.text_stream is not None:
            state["text"] = self.text_stream.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mix.set_state(state["mix"])
        self.pairs.load_state_dict(state["pairs"])
        self.counts = dict(state["counts"])
        if self.text_stream is not None:
            self.text_stream.load_state_dict(state["text"])

    def load_resplit(self, states: list[dict[str, Any]], old_world_size: int, seed: int) -> None:
        """Continue from the states of a run with `old_world_size` processes (see `LatentStream.load_resplit`);
        the mixing draws restart from `seed`; a process carries on the counts of the old process of its rank."""
        self.mix.manual_seed(seed)
        self.pairs.load_resplit([st["pairs"] for st in states], old_world_size)
        if self.text_stream is not None:
            self.text_stream.load_resplit([st["text"] for st in states], old_world_size)
        old = states[self.rank]["counts"] if self.rank < len(states) else {}
        self.counts = {k: int(old.get(k, 0)) for k in self.counts}


class PaddedBatches:
    """`rows` samples per micro-batch, one per row, padded to the longest (`data.packing: false`)."""

    def __init__(self, stream: TrainingStream, collator: Collator, rows: int) -> None:
        self.stream, self.collator, self.rows = stream, collator, rows

    def next_batch(self) -> Batch:
        return self.collator.collate_padded(self.stream.next_samples(self.rows))

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)

    def load_resplit(self, states: list[dict[str, Any]], old_world_size: int, seed: int) -> None:
        self.stream.load_resplit(states, old_world_size, seed)


class PackedBatches:
    """Micro-batches of exactly `rows` rows of `budget` tokens, each row filled with as many samples as fit
    (`data.packing: true`; document masks keep the samples apart).

    Samples are drawn `draw` at a time and placed first-fit in draw order; the first one that fits no row
    ends the micro-batch and opens the next, so no sample is dropped or reordered across batches. Drawn
    samples not yet placed are part of the state, so a resumed run packs exactly the same rows."""

    def __init__(self, stream: TrainingStream, collator: Collator, rows: int, budget: int, draw: int = 16) -> None:
        self.stream, self.collator, self.rows, self.budget, self.draw = stream, collator, rows, budget, draw
        self.pending: list[Sample] = []

    def next_batch(self) -> Batch:
        used = [0] * self.rows
        chosen: list[Sample] = []
        while True:
            if not self.pending:
                self.pending = self.stream.next_samples(self.draw)
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

    def state_dict(self) -> dict[str, Any]:
        pending = [{"segments": list(s.segments), "image_first": s.image_first} for s in self.pending]
        return {**self.stream.state_dict(), "pending": pending}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        self.pending = [Sample(list(p["segments"]), p["image_first"]) for p in state.pop("pending", [])]
        self.stream.load_state_dict(state)

    def load_resplit(self, states: list[dict[str, Any]], old_world_size: int, seed: int) -> None:
        """As `TrainingStream.load_resplit`; the old ranks' drawn but unplaced samples (less than a row each)
        are not carried over."""
        self.pending = []
        self.stream.load_resplit([{k: v for k, v in st.items() if k != "pending"} for st in states],
                                 old_world_size, seed)


def build_batches(config: Any, stream: TrainingStream, collator: Collator) -> PaddedBatches | PackedBatches:
    """`train.batch_size` rows per micro-batch: one sample per row, or packed rows of `data.token_budget`."""
    data, rows = config.data, config.train.batch_size
    if data.packing:
        return PackedBatches(stream, collator, rows, data.token_budget or config.model.max_seq_len)
    return PaddedBatches(stream, collator, rows)


def build_stream(config: Any, tokenizer: Any, rank: int, world_size: int, device: torch.device):
    """(TrainingStream of this rank, latent shape, the VAE path the latents belong to, the VAE model when
    images are encoded on the fly, else None) for a run config (`transfusion_mot.run.RunConfig`)."""
    from vae import load_vae
    from vae.latents import LatentDataset, LatentStream

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
        source = ImagePairSource(LatentStream(dataset, seed=seed, rank=rank, world_size=world_size, drop_last=True))
    else:
        if not vae_path:
            raise ConfigError(f"data.kind {data.kind!r} encodes images on the fly: set vae.path (or --vae)")
        vae_model = load_vae(vae_path, device=device)
        vae_model.requires_grad_(False).eval()
        size = data.image_size or int(vae_model.config.sample_size)
        if data.kind == "folder":
            stream = LatentStream(ImageFolderReader(data.path, split=data.split, size=size), seed=seed,
                                  rank=rank, world_size=world_size, drop_last=True)
            if data.num_workers:
                stream = PrefetchedItems(stream, data.num_workers, data.prefetch_factor)
        else:
            stream = ShardItems(WebDatasetReader(data.path, shuffle_buffer=data.shuffle_buffer, seed=seed, rank=rank,
                                                 world_size=world_size, size=size),
                                data.num_workers, data.prefetch_factor)
        factor = 2 ** (len(vae_model.config.block_out_channels) - 1)
        latent_shape = (int(vae_model.config.latent_channels), size // factor, size // factor)
        source = ImagePairSource(stream, vae=vae_model, device=device)
    text_stream = None
    if data.text_only_path and data.text_only_ratio > 0:
        docs = read_text_documents(data.text_only_path)
        if len(docs) < world_size:
            raise InvalidInput(f"{data.text_only_path}: {len(docs)} documents cannot be shared by {world_size} "
                               "processes")
        # each process reads its own share of the documents (an epoch covers the corpus once over all ranks)
        text_stream = LatentStream(docs, seed=seed + 7919, rank=rank, world_size=world_size)
    max_doc = (data.token_budget or config.model.max_seq_len) - 2  # BOS and EOS
    stream = TrainingStream(source, tokenizer, seed=seed, rank=rank,
                            image_first_ratio=data.image_first_ratio, caption_dropout=data.caption_dropout,
                            text_stream=text_stream, text_only_ratio=data.text_only_ratio,
                            max_text_tokens=config.tokenizer.max_text_tokens, overflow=config.tokenizer.overflow,
                            max_doc_tokens=max_doc)
    check_latent_shape(config.model, latent_shape)
    return stream, latent_shape, vae_path, vae_model


def check_latent_shape(model_config: Any, latent_shape: tuple[int, ...]) -> None:
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
