"""The three kinds of training data behind one interface, so that what a run does with its data is written
once, not once per kind: a latent cache (`tmot vae encode`: latents ready to train on), an image folder
(metadata.jsonl) and WebDataset shards (images encoded on the fly by the run's VAE).

A `DataSource` gives a run its training captions (what a BPE learns from), this process's share of the
training items (a `ResumableStream`), and its held-out items (or why it has none). `open_source` picks the
kind a data section names, or tells it from what the path holds ("auto").
"""

from __future__ import annotations

from itertools import islice
from pathlib import Path
from typing import Any, Iterator, Protocol

from ..common.errors import ConfigError, InputNotFound, InvalidInput
from .imageio import METADATA, folder_captions, read_metadata
from .latents import INDEX_FILE, LatentDataset, is_latent_cache
from .readers import ImageFolderReader, WebDatasetReader, webdataset_captions
from .streams import PrefetchedStream, ShardStream, ShuffledStream, evenly_spaced

# a corpus of millions of captions needs no more than this many for a BPE of a few thousand ids
MAX_TOKENIZER_CAPTIONS = 200_000


class DataSpec(Protocol):
    """What a source reads from a run's data section (`transfusion_mot.config.DataConfig`)."""

    kind: str
    path: str | None
    split: str
    val_path: str | None
    val_split: str
    shuffle_buffer: int
    num_workers: int
    prefetch_factor: int


class DataSource:
    """One kind of training data at `spec.path`. Items are dicts with "text" and either "latent" (C, H, W)
    or, where `encodes_images`, "image" (3, size, size) in [-1, 1]."""

    kind = ""
    noun = ""  # what its held-out data is, in messages
    encodes_images = True

    def __init__(self, spec: DataSpec) -> None:
        if not spec.path:
            raise ConfigError("data.path is not set: pass --data (a latent cache, image folder or shard pattern) "
                              "or set data.builtin: shapes")
        self.spec = spec

    def captions(self) -> Iterator[str]:
        """The training captions, in order, no image decoded."""
        raise NotImplementedError

    def items(self, seed: int, rank: int, world_size: int, size: int | None) -> Any:
        """This process's share of the training items, shuffled per epoch, as a `ResumableStream`."""
        raise NotImplementedError

    def missing_held_out(self) -> str | None:
        """Why there is no held-out data (None when there is)."""
        return None if self.spec.val_path else f"data.val_path (held-out {self.noun}, --val-data) is not set"

    def held_out(self, n: int, size: int | None) -> tuple[list[dict[str, Any]], str]:
        """Up to n held-out items, the same ones every time, and where they came from."""
        raise NotImplementedError


class LatentCacheSource(DataSource):
    """A latent cache: latents ready to train on, and the VAE that made them (its index says which)."""

    kind, noun = "latents", "latents"
    encodes_images = False

    def __init__(self, spec: DataSpec) -> None:
        super().__init__(spec)
        self.dataset = LatentDataset(spec.path)
        self.latent_shape = tuple(self.dataset.latent_shape)
        self.codebook_size = self.dataset.codebook_size  # a cache of VQ codes; None for latents
        self.vae = self.dataset.info.get("vae")

    def captions(self) -> Iterator[str]:
        return self.dataset.captions()

    def items(self, seed: int, rank: int, world_size: int, size: int | None) -> ShuffledStream:
        return ShuffledStream(self.dataset, seed=seed, rank=rank, world_size=world_size, drop_last=True)

    def held_out(self, n: int, size: int | None) -> tuple[list[dict[str, Any]], str]:
        if not self.spec.val_path:
            raise ConfigError("validation (train.eval_every > 0) needs held-out latents: set data.val_path (or "
                              "--val-data) to a cache of the val split, e.g. `tmot vae encode --split val`")
        held = LatentDataset(self.spec.val_path)
        return [held[i] for i in evenly_spaced(len(held), n)], str(self.spec.val_path)


class ImageFolderSource(DataSource):
    """An image folder: rows of `spec.split` train, rows of `spec.val_split` (of val_path, default the same
    folder) are held out; decoded ahead by `spec.num_workers` worker processes."""

    kind, noun = "folder", "images"

    def captions(self) -> Iterator[str]:
        return folder_captions(self.spec.path, self.spec.split)

    def items(self, seed: int, rank: int, world_size: int, size: int | None) -> Any:
        s = self.spec
        stream = ShuffledStream(ImageFolderReader(s.path, split=s.split, size=size), seed=seed, rank=rank,
                                world_size=world_size, drop_last=True)
        return PrefetchedStream(stream, s.num_workers, s.prefetch_factor) if s.num_workers else stream

    def missing_held_out(self) -> str | None:
        folder = self.spec.val_path or self.spec.path
        if read_metadata(folder, split=self.spec.val_split):
            return None
        return f"{Path(folder) / METADATA} has no rows of split {self.spec.val_split!r} (data.val_split, data.val_path)"

    def held_out(self, n: int, size: int | None) -> tuple[list[dict[str, Any]], str]:
        folder, split = self.spec.val_path or self.spec.path, self.spec.val_split
        reader = ImageFolderReader(folder, split=split, size=size)
        if len(reader) == 0:
            raise ConfigError(f"validation: {folder}/{METADATA} has no rows with split {split!r}; set data.val_split "
                              "or data.val_path, or train.eval_every=0")
        return [reader[i] for i in evenly_spaced(len(reader), n)], f"{folder} (split {split})"


class ShardSource(DataSource):
    """WebDataset shards (braces allowed), read by `spec.num_workers` worker processes; the held-out set is the
    first samples of the shards at val_path."""

    kind, noun = "webdataset", "shards"

    def captions(self) -> Iterator[str]:
        return webdataset_captions(self.spec.path, limit=MAX_TOKENIZER_CAPTIONS)

    def items(self, seed: int, rank: int, world_size: int, size: int | None) -> ShardStream:
        s = self.spec
        reader = WebDatasetReader(s.path, shuffle_buffer=s.shuffle_buffer, seed=seed, rank=rank,
                                  world_size=world_size, size=size)
        return ShardStream(reader, s.num_workers, s.prefetch_factor)

    def held_out(self, n: int, size: int | None) -> tuple[list[dict[str, Any]], str]:
        if not self.spec.val_path:
            raise ConfigError("validation on WebDataset shards needs data.val_path: held-out shards (braces ok)")
        items = list(islice(WebDatasetReader(self.spec.val_path, shuffle_buffer=0, seed=0, size=size), n))
        if not items:
            raise ConfigError(f"validation: no readable samples in {self.spec.val_path}")
        return items, str(self.spec.val_path)


SOURCES: dict[str, type[DataSource]] = {"latents": LatentCacheSource, "folder": ImageFolderSource,
                                        "webdataset": ShardSource}
IMAGE_KINDS = tuple(kind for kind, source in SOURCES.items() if source.encodes_images)


def data_kind(path: str | Path) -> str:
    """What `path` holds: "latents" (a latent cache), "folder" (an image folder with metadata.jsonl) or
    "webdataset" (.tar shards, braces allowed); a one-line error for anything else."""
    folder = Path(path)
    if is_latent_cache(folder):
        return "latents"
    if (folder / METADATA).is_file():
        return "folder"
    if ".tar" in str(path):
        return "webdataset"
    if not folder.exists():
        raise InputNotFound(f"data.path {path}: not found (expected a latent cache, an image folder or .tar shards)")
    raise InvalidInput(f"data.path {path}: neither a latent cache ({INDEX_FILE}), an image folder ({METADATA}) nor "
                       ".tar shards")


def open_source(spec: DataSpec) -> DataSource:
    """The source of a data section: of its kind, or ("auto") of the kind its path holds."""
    if not spec.path:
        raise ConfigError("data.path is not set: pass --data (a latent cache, image folder or shard pattern) "
                          "or set data.builtin: shapes")
    return SOURCES[data_kind(spec.path) if spec.kind == "auto" else spec.kind](spec)


__all__ = ["DataSource", "DataSpec", "IMAGE_KINDS", "ImageFolderSource", "LatentCacheSource", "MAX_TOKENIZER_CAPTIONS",
           "SOURCES",
           "ShardSource", "data_kind", "open_source"]
