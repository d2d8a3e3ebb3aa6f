"""Latent caches: encode an image folder once, then train the diffusion model on the cached latents.

Layout of a cache directory `OUT`:
  latents-00000.safetensors  tensors `latents` (N, C, h, w) float32 or bfloat16, normalised as the
                             diffusion model sees them ((z - shift) * scale); `index` (N,) int64, the source
                             row in metadata.jsonl; with mode "mean_logvar" also `logvar` (N, C, h, w), the
                             posterior log-variance in the same normalised space (so z = latents +
                             exp(logvar / 2) * eps samples the posterior).
  latents-00000.jsonl        one line per latent, same order: {"index", "text", "meta": the metadata row}
  index.json                 shard list and counts, latent shape, dtype, mode, the VAE path and its
                             scaling/shift factors, the source data directory.
Every file is written to a temporary name and renamed, and index.json last: a cache with index.json is
complete.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor

from transfusion_mot.common.errors import InputNotFound, InvalidInput, describe
from transfusion_mot.common.files import atomic_write_bytes, file_sha256, manifest_problem
from transfusion_mot.data.readers import ImageFolderReader

from .autoencoder import encode, latent_scale_shift, load_vae

MODES = ("mean", "mean_logvar", "sample")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
INDEX_FILE = "index.json"


def _atomic_save_safetensors(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save

    atomic_write_bytes(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))


@torch.no_grad()
def encode_folder(vae_dir_or_model: str | Path | Any, data_dir: str | Path, out_dir: str | Path,
                  batch_size: int = 64, shard_size: int = 4096, split: str | None = None, mode: str = "mean",
                  dtype: str = "float32", seed: int = 0, device: str | torch.device | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """Encode every image of an image folder (optionally one split) into a sharded latent cache.

    `mode`: "mean" (posterior mean, deterministic: the default), "mean_logvar" (mean plus log-variance,
    so training can re-sample), or "sample" (one draw with a generator seeded by `seed`). Returns the
    index.json contents."""
    from tqdm.auto import tqdm

    if mode not in MODES:
        raise InvalidInput(f"mode must be one of {list(MODES)}, got {mode!r}")
    if dtype not in DTYPES:
        raise InvalidInput(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if batch_size <= 0 or shard_size <= 0:
        raise InvalidInput("batch_size and shard_size must be positive")
    if isinstance(vae_dir_or_model, (str, Path)):
        vae_path: str | None = str(vae_dir_or_model)
        vae = load_vae(vae_dir_or_model, device=device)
    else:
        vae = vae_dir_or_model
        vae_path = getattr(vae.config, "_name_or_path", None) or None
        if device is not None:
            vae.to(device)
    was_training = vae.training
    vae.eval()
    scale, shift = latent_scale_shift(vae)
    size = int(vae.config.sample_size) if vae.config.sample_size else None
    dataset = ImageFolderReader(data_dir, split=split, size=size)
    if len(dataset) == 0:
        raise InvalidInput(f"{Path(data_dir) / 'metadata.jsonl'} has no rows of split {split!r} (a row without "
                           "'split' counts as train)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / INDEX_FILE).unlink(missing_ok=True)  # the cache is incomplete until the new index lands
    gen = torch.Generator(device=vae.device).manual_seed(seed)
    torch_dtype = DTYPES[dtype]

    shards: list[dict[str, Any]] = []
    pending: dict[str, list[Tensor]] = {"latents": [], "index": [], "logvar": []}
    pending_rows: list[dict[str, Any]] = []
    latent_shape: list[int] | None = None

    def flush() -> None:
        if not pending_rows:
            return
        k = len(shards)
        name = f"latents-{k:05d}"
        tensors = {"latents": torch.cat(pending["latents"]).to(torch_dtype),
                   "index": torch.cat(pending["index"]).to(torch.int64)}
        if pending["logvar"]:
            tensors["logvar"] = torch.cat(pending["logvar"]).to(torch_dtype)
        _atomic_save_safetensors(tensors, out / f"{name}.safetensors", {"mode": mode})
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pending_rows)
        atomic_write_bytes(out / f"{name}.jsonl", lines.encode())
        shards.append({"file": f"{name}.safetensors", "captions": f"{name}.jsonl", "count": len(pending_rows),
                       "files": {f: {"size": (out / f).stat().st_size, "sha256": file_sha256(out / f)}
                                 for f in (f"{name}.safetensors", f"{name}.jsonl")}})
        for v in pending.values():
            v.clear()
        pending_rows.clear()

    bar = tqdm(total=len(dataset), disable=not progress, desc="encode", unit="img", dynamic_ncols=True)
    for batch in dataset.batches(batch_size):  # unreadable images are skipped and counted
        x = batch["image"].to(vae.device)
        if mode == "mean":
            z = encode(vae, x)
        elif mode == "sample":
            z = encode(vae, x, sample=True, generator=gen)
        else:
            posterior = vae.encode(x.to(vae.dtype)).latent_dist
            z = (posterior.mean - shift) * scale
            pending["logvar"].append((posterior.logvar + 2 * float(np.log(abs(scale)))).float().cpu())
        latent_shape = list(z.shape[1:])
        pending["latents"].append(z.float().cpu())
        pending["index"].append(batch["index"])
        for idx, text, meta in zip(batch["index"].tolist(), batch["text"], batch["meta"]):
            pending_rows.append({"index": idx, "text": text, "meta": meta})
        # shards hold exactly shard_size rows (the last one fewer), whatever batch_size is
        while len(pending_rows) >= shard_size:
            extra_rows = pending_rows[shard_size:]
            del pending_rows[shard_size:]
            extra = {}
            for key, parts in pending.items():
                if parts:
                    cat = torch.cat(parts)
                    parts[:] = [cat[:shard_size]]
                    extra[key] = cat[shard_size:]
            flush()
            pending_rows.extend(extra_rows)
            for key, rest in extra.items():
                if len(rest):
                    pending[key].append(rest)
        bar.update(len(batch["index"]))
    flush()
    bar.close()
    if latent_shape is None:
        raise InvalidInput(f"{data_dir}: none of its {len(dataset)} images could be read")
    if was_training:
        vae.train()

    # shards from an earlier, larger cache in the same directory would confuse anyone listing files
    keep = {s["file"] for s in shards} | {s["captions"] for s in shards}
    for p in out.glob("latents-*"):
        if p.name not in keep:
            p.unlink()
    index = {"format": "tmot-latents/1", "shards": shards, "count": sum(s["count"] for s in shards),
             "latent_shape": latent_shape, "dtype": dtype, "mode": mode, "normalized": True,
             "vae": str(Path(vae_path).resolve()) if vae_path and Path(vae_path).exists() else vae_path,
             "scaling_factor": scale, "shift_factor": shift, "image_size": size,
             "data_dir": str(Path(data_dir).resolve()), "split": split, "skipped_images": dataset.skipped}
    atomic_write_bytes(out / INDEX_FILE, (json.dumps(index, indent=2) + "\n").encode())
    return index


class LatentDataset(torch.utils.data.Dataset):
    """Random access into a latent cache without loading it: tensors come from memory-mapped safetensors
    (`safe_open`, one row sliced per item), captions from byte offsets into the jsonl sidecars.

    Items: {"latent": (C, h, w) float32, "text", "index" (source row), "meta"}, plus "logvar" for
    mean_logvar caches. Picklable (file handles reopen lazily), so DataLoader workers work."""

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
        self._handles: dict[int, Any] = {}
        for k, shard in enumerate(self.shards):  # the index agrees with the shards (headers only)
            try:
                rows = self._handle(k).get_slice("latents").get_shape()[0]
            except Exception as err:
                raise InvalidInput(f"damaged latent cache {self.root}: cannot read {shard['file']} "
                                   f"({describe(err)}); encode it again") from None
            if rows != int(shard["count"]):
                raise InvalidInput(f"damaged latent cache {self.root}: {shard['file']} holds {rows} latents but "
                                   f"index.json says {shard['count']}; encode it again")
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._offsets: list[np.ndarray | None] = [None] * len(self.shards)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.info["latent_shape"])

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
        path = self.root / self.shards[shard]["captions"]
        if self._offsets[shard] is None:
            offsets = [0]
            with path.open("rb") as f:
                for line in f:
                    offsets.append(offsets[-1] + len(line))
            self._offsets[shard] = np.asarray(offsets, dtype=np.int64)
        offsets = self._offsets[shard]
        with path.open("rb") as f:
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
            f = self._handle(shard)
            item: dict[str, Any] = {"latent": f.get_slice("latents")[row].float()}
            if "logvar" in f.keys():
                item["logvar"] = f.get_slice("logvar")[row].float()
            line = self._line(shard, row)
            item["text"] = line["text"]
            item["index"] = int(f.get_slice("index")[row : row + 1][0])
            item["meta"] = line["meta"]
        except Exception as err:  # a shard or caption file cut short or overwritten (older caches: no manifest)
            raise InvalidInput(f"damaged latent cache {self.root}: cannot read row {row} of "
                               f"{self.shards[shard]['file']} ({describe(err)}); encode it again") from None
        return item
