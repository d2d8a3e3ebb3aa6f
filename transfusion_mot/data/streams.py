"""Resumable streams: the one protocol every source of training items follows, and the sources themselves.

A training run must stop at any step and continue with exactly the items it would have seen, on the same
number of processes (bit-exact) or on another (re-split). So every stream, from the one that shuffles a data
set to the one that packs rows, is a `ResumableStream`:

    next(stream)                      the next item
    stream.state_dict()               where it stands, as plain data (saved in each process's checkpoint file)
    stream.load_state_dict(state)     continue from there
    stream.load_resplit(states, r)    continue, as this process, from the states of ALL the processes of a run
                                      that had `r.old_world_size` of them (`r.seed` re-seeds random draws)

A stream built on another one derives from `StreamWrapper`, which hands the state to the stream it reads
from (`source`), after `reset` drops whatever it holds ahead (prefetching workers, an open epoch).

Sources here: `ShuffledStream` (any map-style data set: a latent cache, an image folder, text documents),
`PrefetchedStream` (the same, decoded ahead by DataLoader worker processes), `ShardStream` (WebDataset
shards, epoch after epoch) and `ImagePairSource` (any of them as (latent, caption) pairs, images encoded on
the way). `read_text_documents` reads a text corpus (one document per line, or JSONL).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, TypeVar, runtime_checkable

import torch
from torch import Tensor

from ..common.errors import InvalidInput
from ..common.files import read_texts

T = TypeVar("T", covariant=True)
State = dict[str, Any]


@dataclass(frozen=True)
class Resplit:
    """How a run resumes on another number of processes: the old world size, and a seed for this process's
    random draws (they cannot continue: the old draws belonged to other processes)."""

    old_world_size: int
    seed: int


@runtime_checkable
class ResumableStream(Protocol[T]):
    def __next__(self) -> T: ...

    def state_dict(self) -> State: ...

    def load_state_dict(self, state: State) -> None: ...

    def load_resplit(self, states: list[State], resplit: Resplit) -> None: ...


class StreamWrapper:
    """A stream that reads from `self.source` and keeps no state of its own: its state is the source's.
    Subclasses that hold items ahead (workers, an open iterator) drop them in `reset`."""

    source: Any

    def __iter__(self) -> StreamWrapper:
        return self

    def reset(self) -> None:
        """Drop whatever was read ahead of the delivered position (called before a state is loaded)."""

    def close(self) -> None:
        """Stop what this stream and the streams it wraps run ahead (worker processes) now, not whenever the
        stream is dropped; reading on restarts them at the delivered position."""
        self.reset()
        if isinstance(self.source, StreamWrapper):
            self.source.close()

    def state_dict(self) -> State:
        return self.source.state_dict()

    def load_state_dict(self, state: State) -> None:
        self.reset()
        self.source.load_state_dict(state)

    def load_resplit(self, states: list[State], resplit: Resplit) -> None:
        self.reset()
        self.source.load_resplit(states, resplit)


def read_text_documents(path: str | Path) -> list[str]:
    """A text corpus: .jsonl with a "text" field per line, or plain text with one document per line."""
    docs = read_texts(path, ("text",), "text-only corpus")
    if not docs:
        raise InvalidInput(f"{path}: no documents (empty file)")
    return docs


def evenly_spaced(total: int, n: int) -> list[int]:
    """n indices spread over range(total) (all of them when n >= total): a held-out subset that does not
    depend on how the source happens to be ordered at its start."""
    if n >= total:
        return list(range(total))
    return [int(i * total / n) for i in range(n)]


class TextDocuments:
    """A text corpus as a map-style data set of its documents (`read_text_documents`), read on first use."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._docs: list[str] | None = None

    def _read(self) -> list[str]:
        if self._docs is None:
            self._docs = read_text_documents(self.path)
        return self._docs

    def __len__(self) -> int:
        return len(self._read())

    def __getitem__(self, i: int) -> str:
        return self._read()[i]


def held_out_documents(path: str | Path, n: int) -> list[str]:
    """Up to n held-out text documents, evenly spaced over the file: the same ones every time."""
    docs = TextDocuments(path)
    return [docs[i] for i in evenly_spaced(len(docs), n)]


class ShuffledStream:
    """Infinite, shuffled, resumable stream of a map-style data set's items (`dataset[i]`, `len(dataset)`).

    Epoch e visits `randperm(N, generator seeded with seed + e)`; rank r of `world_size` takes the strided
    slice perm[r::world_size] (disjoint, together covering every item once per epoch; with drop_last the
    slices are cut to equal length so data-parallel ranks stay in step). `state_dict()` after k items
    lets a fresh stream continue with exactly item k + 1. `load_resplit` continues from the states of a
    run with another number of ranks: the epoch resumes after the items every old rank had consumed
    (`start`: the epoch's order then begins at that item), so nothing is skipped and at most the items
    some old ranks had read beyond the slowest one are seen twice."""

    def __init__(self, dataset: Any, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 drop_last: bool = False) -> None:
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if len(dataset) < world_size:
            raise InvalidInput(f"{len(dataset)} items cannot be shared by {world_size} processes")
        self.dataset = dataset
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.position = 0
        self.start: tuple[int, int] | None = None  # (epoch, first item of its order) after a re-split
        self._order: Tensor | None = None

    def epoch_order(self, epoch: int) -> Tensor:
        """Dataset positions this rank visits in `epoch`, in order."""
        n = len(self.dataset)
        if self.shuffle:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))
        else:
            perm = torch.arange(n)
        if self.start is not None and self.start[0] == epoch:
            perm = perm[self.start[1]:]
        if self.drop_last:
            perm = perm[: len(perm) - len(perm) % self.world_size]
        return perm[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[Any]:
        return self

    def next_index(self) -> int:
        """Advance and return the dataset position of the next item (no data loaded)."""
        if self._order is None:
            self._order = self.epoch_order(self.epoch)
        while self.position >= len(self._order):
            self.epoch += 1
            self.position = 0
            self._order = self.epoch_order(self.epoch)
        i = int(self._order[self.position])
        self.position += 1
        return i

    def __next__(self) -> Any:
        return self.dataset[self.next_index()]

    def take(self, n: int) -> list[Any]:
        """The next `n` items as a list (a training batch)."""
        return [next(self) for _ in range(n)]

    def copy(self) -> ShuffledStream:
        """A stream over the same items, at the same position, advancing on its own."""
        twin = ShuffledStream(self.dataset, seed=self.seed, rank=self.rank, world_size=self.world_size,
                              shuffle=self.shuffle, drop_last=self.drop_last)
        twin.load_state_dict(self.state_dict())
        return twin

    def state_dict(self) -> State:
        state: State = {"epoch": self.epoch, "position": self.position, "seed": self.seed}
        if self.start is not None:
            state["start"] = list(self.start)
        return state

    def load_state_dict(self, state: State) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.seed = int(state["seed"])
        self.start = tuple(int(v) for v in state["start"]) if state.get("start") is not None else None
        self._order = None

    def load_resplit(self, states: list[State], resplit: Resplit) -> None:
        """Continue, as this rank of this world size, from the states of all the old ranks (the order is the
        data set's, so `resplit.seed` is not needed)."""
        slowest = min(states, key=lambda st: (int(st["epoch"]), int(st["position"])))
        epoch, position = int(slowest["epoch"]), int(slowest["position"])
        old_start = slowest.get("start")
        first = int(old_start[1]) if old_start is not None and int(old_start[0]) == epoch else 0
        # every old rank had consumed old-order positions < `position`, i.e. items < first + position * world
        self.load_state_dict({"epoch": epoch, "position": 0, "seed": slowest["seed"],
                              "start": [epoch, first + position * resplit.old_world_size]})


def _indices_from(order: ShuffledStream) -> Iterator[int]:
    """The item indices `order` gives from its position on, for workers to read ahead. It holds the copy
    alone, not the stream: the DataLoader iterator refers to no stream that refers back to it, so dropping its
    stream stops its workers at once (in a reference cycle they would wait for the garbage collector)."""
    while True:
        yield order.next_index()


class PrefetchedStream(StreamWrapper):
    """A `ShuffledStream`'s items decoded ahead of use by DataLoader worker processes (`num_workers`, each
    `prefetch_factor` items ahead), delivered in order.

    The main process keeps `source` in step with what it has delivered (the workers read ahead of it), so
    the state resumes at the exact next item; loading a state restarts the workers there."""

    def __init__(self, source: ShuffledStream, num_workers: int, prefetch_factor: int = 2) -> None:
        self.source, self.num_workers, self.prefetch_factor = source, num_workers, prefetch_factor
        self._iter: Iterator[Any] | None = None

    def __next__(self) -> Any:
        if self._iter is None:
            from torch.utils.data import DataLoader

            indices = _indices_from(self.source.copy())
            self._iter = iter(DataLoader(self.source.dataset, batch_size=None, sampler=indices,
                                         num_workers=self.num_workers, prefetch_factor=self.prefetch_factor))
        item = next(self._iter)
        self.source.next_index()  # the delivered item's position
        return item

    def reset(self) -> None:
        self._iter = None  # the DataLoader iterator's last reference: it stops its workers here


class ShardStream(StreamWrapper):
    """A `WebDatasetReader`'s samples, epoch after epoch; with `num_workers` > 0 they are read and decoded by
    DataLoader worker processes (the reader's own tracking keeps its state exact at the delivered sample)."""

    def __init__(self, source: Any, num_workers: int = 0, prefetch_factor: int = 2) -> None:
        self.source, self.num_workers, self.prefetch_factor = source, num_workers, prefetch_factor
        self._iter: Iterator[Any] | None = None

    def __next__(self) -> Any:
        for _ in range(2):  # one iter() is (the rest of) one epoch; an empty epoch means no usable sample
            if self._iter is None:
                extra = {"prefetch_factor": self.prefetch_factor} if self.num_workers else {}
                self._iter = iter(self.source.loader(batch_size=None, num_workers=self.num_workers, **extra))
            try:
                return next(self._iter)
            except StopIteration:
                self._iter = None
        raise InvalidInput(f"{self.source.urls[0]}...: a whole epoch of the shards gave no readable sample")

    def reset(self) -> None:
        self._iter = None


class ImagePairSource(StreamWrapper):
    """Image-caption pairs as (latent (C, H, W) or code grid (h, w), caption) from an item stream: a `ShuffledStream` over a
    map-style data set, a `PrefetchedStream` (the same, decoded by worker processes) or a `ShardStream`.

    Items carry cached latents, or (with `encode`, images (N, 3, H, W) in [-1, 1] -> latents: a VAE's
    posterior mean, so the stream stays deterministic) images that are encoded here, `take` at a time."""

    def __init__(self, source: Any, encode: Callable[[Tensor], Tensor] | None = None) -> None:
        self.source = source
        self.encode = encode

    def __next__(self) -> tuple[Tensor, str]:
        return self.take(1)[0]

    def take(self, n: int) -> list[tuple[Tensor, str]]:
        items = [next(self.source) for _ in range(n)]
        texts = [item["text"] or "" for item in items]
        if self.encode is None:
            return [(item["latent"], t) for item, t in zip(items, texts)]
        with torch.no_grad():
            latents = self.encode(torch.stack([item["image"] for item in items])).cpu()
        # a VQ tokenizer's code grids stay integers; latents are float32 whatever the VAE computed in
        return list(zip(latents if not latents.is_floating_point() else latents.float(), texts))


__all__ = ["ImagePairSource", "PrefetchedStream", "Resplit", "ResumableStream", "ShardStream", "ShuffledStream",
           "State", "StreamWrapper", "TextDocuments", "evenly_spaced", "held_out_documents", "read_text_documents"]
