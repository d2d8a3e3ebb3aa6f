"""Reading a latent cache (written by `vae.latents.encode_folder`, `tmot vae encode`): random access to its
latents and captions without loading it, for training, held-out sets and tokenizers.

Layout of a cache directory:
  latents-00000.safetensors  tensors `latents`: for kind "latents" (an AutoencoderKL's) (N, C, h, w) float32 or
                             bfloat16, normalised as the diffusion model sees them ((z - shift) * scale); for
                             kind "codes" (a VQModel's: images as discrete tokens) (N, h, w) int64 codebook
                             indices in [0, codebook_size). `index` (N,) int64, the source row in
                             metadata.jsonl; with mode "mean_logvar" (latents only) also `logvar` (N, C, h, w),
                             the posterior log-variance in the same normalised space (so z = latents +
                             exp(logvar / 2) * eps samples the posterior).
  latents-00000.jsonl        one line per latent, same order: {"index", "text", "meta": the metadata row}
  index.json                 kind ("latents" or "codes"; caches from before the key are latents), shard list
                             and counts, latent shape ((C, h, w) or (h, w)), dtype, mode, the VAE path and its
                             scaling/shift factors (1 and 0 for codes), codebook_size (codes only), the source
                             data directory; every shard's size and sha256.
Every file is written to a temporary name and renamed, and index.json last: a cache with index.json is
complete.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ..common.errors import InputNotFound, InvalidInput, describe
from ..common.files import manifest_problem

INDEX_FILE = "index.json"


def is_latent_cache(path: str | Path) -> bool:
    return (Path(path) / INDEX_FILE).is_file()


class LatentDataset(torch.utils.data.Dataset):
    """Random access into a latent cache without loading it: tensors come from memory-mapped safetensors
    (`safe_open`: each shard's tensors mapped once, one row copied per item), captions from byte offsets into the jsonl sidecars.

    Items: {"latent": (C, h, w) float32, "text", "index" (source row), "meta"}, plus "logvar" for
    mean_logvar caches; for a codes cache "latent" is (h, w) int64 codes, left integer. Picklable (file
    handles reopen lazily), so DataLoader workers work."""

    def __init__(self, cache_dir: str | Path) -> None:
        self.root = Path(cache_dir)
        index_path = self.root / INDEX_FILE
        if not index_path.is_file():
            raise InputNotFound(f"{index_path}: not found (not a latent cache, or encoding did not "
                                    "finish); create one with `tmot vae encode` / vae.latents.encode_folder")
        try:
            self.info = json.loads(index_path.read_text())
            self.shards = self.info["shards"]
            counts = [int(s["count"]) for s in self.shards]
        except (ValueError, KeyError, TypeError) as err:
            raise InvalidInput(f"{index_path}: damaged latent cache index ({type(err).__name__}: {err})") from None
        for shard in self.shards:  # sizes and sha256 recorded at encoding (caches from before: not checked)
            problem = manifest_problem(self.root, shard["files"]) if isinstance(shard.get("files"), dict) else None
            if problem:
                raise InvalidInput(f"damaged latent cache {self.root}: {problem}; encode it again (tmot vae encode)")
        self._handles: dict[int, Any] = {}  # per shard, opened once per process: safetensors handle,
        self._tensors: dict[int, dict[str, Any]] = {}  # its tensors (memory-mapped: pages load when read),
        self._caption_files: dict[int, Any] = {}  # and its caption file
        for k, shard in enumerate(self.shards):  # the index agrees with the shards (headers only)
            try:
                rows = self._handle(k).get_slice("latents").get_shape()[0]
            except Exception as err:
                raise InvalidInput(f"damaged latent cache {self.root}: cannot read {shard['file']} "
                                   f"({describe(err)}); encode it again") from None
            if rows != int(shard["count"]):
                raise InvalidInput(f"damaged latent cache {self.root}: {shard['file']} holds {rows} latents but "
                                   f"{INDEX_FILE} says {shard['count']}; encode it again")
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._offsets: list[np.ndarray | None] = [None] * len(self.shards)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"], state["_tensors"], state["_caption_files"] = {}, {}, {}
        return state

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.info["latent_shape"])

    @property
    def kind(self) -> str:
        """"latents" (continuous, an AutoencoderKL's) or "codes" (discrete tokens, a VQModel's)."""
        return str(self.info.get("kind", "latents"))

    @property
    def codebook_size(self) -> int | None:
        """The number of codes K of a codes cache (its tokens are 0..K-1); None for latents."""
        size = self.info.get("codebook_size")
        return None if size is None else int(size)

    @property
    def scaling_factor(self) -> float:
        return float(self.info["scaling_factor"])

    @property
    def shift_factor(self) -> float:
        return float(self.info["shift_factor"])

    def _locate(self, i: int) -> tuple[int, int]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"latent index {i} out of range for {n} latents")
        i %= n
        shard = int(np.searchsorted(self._starts, i, side="right") - 1)
        return shard, i - int(self._starts[shard])

    def _handle(self, shard: int) -> Any:
        from safetensors import safe_open

        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.root / self.shards[shard]["file"]), framework="pt")
        return self._handles[shard]

    def _line(self, shard: int, row: int) -> dict[str, Any]:
        if self._offsets[shard] is None:
            path = self.root / self.shards[shard]["captions"]
            offsets = [0]
            with path.open("rb") as f:
                for line in f:
                    offsets.append(offsets[-1] + len(line))
            self._offsets[shard] = np.asarray(offsets, dtype=np.int64)
        offsets = self._offsets[shard]
        if shard not in self._caption_files:
            self._caption_files[shard] = (self.root / self.shards[shard]["captions"]).open("rb")
        f = self._caption_files[shard]
        f.seek(int(offsets[row]))
        return json.loads(f.read(int(offsets[row + 1] - offsets[row])))

    def captions(self) -> Iterator[str]:
        """Every caption of the cache in order, read from the jsonl sidecars alone (no latent is touched):
        what a tokenizer of this data learns from."""
        for shard in self.shards:
            with (self.root / shard["captions"]).open(encoding="utf-8") as f:
                for line in f:
                    text = json.loads(line).get("text")
                    if text:
                        yield text

    def __getitem__(self, i: int) -> dict[str, Any]:
        shard, row = self._locate(int(i))
        try:
            if shard not in self._tensors:  # whole mapped tensors, indexed per row: ~3x faster than per-row slices
                f = self._handle(shard)
                self._tensors[shard] = {name: f.get_tensor(name) for name in f.keys()}
            tensors = self._tensors[shard]
            latent = tensors["latents"][row]
            item: dict[str, Any] = {"latent": latent.clone() if self.kind == "codes" else latent.to(torch.float32, copy=True)}
            if "logvar" in tensors:
                item["logvar"] = tensors["logvar"][row].to(torch.float32, copy=True)
            line = self._line(shard, row)
            item["text"] = line["text"]
            item["index"] = int(tensors["index"][row])
            item["meta"] = line["meta"]
        except Exception as err:  # a shard or caption file cut short or overwritten (older caches: no manifest)
            raise InvalidInput(f"damaged latent cache {self.root}: cannot read row {row} of "
                               f"{self.shards[shard]['file']} ({describe(err)}); encode it again") from None
        return item
