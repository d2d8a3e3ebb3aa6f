"""Latent caches: encode an image folder once (`encode_folder`, `tmot vae encode`), then train the diffusion model
on the cached latents (an AutoencoderKL's) or the token model on the cached codes (a VQModel's), read by
`transfusion_mot.data.latents.LatentDataset` (whose docstring gives the layout: safetensors shards of latents
or codes, JSONL sidecars of captions, and index.json, written last, so a cache with an index is complete)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from transfusion_mot.common.errors import InvalidInput
from transfusion_mot.common.files import atomic_write_bytes, file_sha256
from transfusion_mot.data.latents import INDEX_FILE
from transfusion_mot.data.readers import ImageFolderReader

from .autoencoder import codebook_size, encode, is_vq, latent_scale_shift, load_vae

MODES = ("mean", "mean_logvar", "sample")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _atomic_save_safetensors(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save

    atomic_write_bytes(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))


class ShardWriter:
    """Writes a latent cache's shards of exactly `shard_size` rows (the last one fewer), whatever the batch size:
    the latents (and log-variances) as safetensors and the caption rows as JSONL beside them, each written to
    a temporary name and renamed, with their sizes and sha256 for the index."""

    def __init__(self, out: Path, shard_size: int, dtype: torch.dtype, mode: str) -> None:
        self.out, self.shard_size, self.dtype, self.mode = out, shard_size, dtype, mode
        self.shards: list[dict[str, Any]] = []
        self.pending: dict[str, list[Tensor]] = {"latents": [], "index": [], "logvar": []}
        self.rows: list[dict[str, Any]] = []

    def add(self, latents: Tensor, index: Tensor, rows: list[dict[str, Any]], logvar: Tensor | None = None) -> None:
        self.pending["latents"].append(latents)
        self.pending["index"].append(index)
        if logvar is not None:
            self.pending["logvar"].append(logvar)
        self.rows += rows
        while len(self.rows) >= self.shard_size:
            self._flush(self.shard_size)

    def close(self) -> list[dict[str, Any]]:
        """Write what is left; the shards' entries for index.json."""
        if self.rows:
            self._flush(len(self.rows))
        return self.shards

    def _flush(self, n: int) -> None:
        name = f"latents-{len(self.shards):05d}"
        tensors = {}
        for key, parts in self.pending.items():
            if parts:
                cat = torch.cat(parts)
                tensors[key] = cat[:n].to(torch.int64 if key == "index" else self.dtype)
                self.pending[key] = [cat[n:]] if len(cat) > n else []
        _atomic_save_safetensors(tensors, self.out / f"{name}.safetensors", {"mode": self.mode})
        rows, self.rows = self.rows[:n], self.rows[n:]
        atomic_write_bytes(self.out / f"{name}.jsonl",
                           "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
        files = (f"{name}.safetensors", f"{name}.jsonl")
        self.shards.append({"file": files[0], "captions": files[1], "count": n,
                            "files": {f: {"size": (self.out / f).stat().st_size, "sha256": file_sha256(self.out / f)}
                                      for f in files}})


def _vae_and_path(vae_dir_or_model: str | Path | Any, device: str | torch.device | None) -> tuple[Any, str | None]:
    if isinstance(vae_dir_or_model, (str, Path)):
        return load_vae(vae_dir_or_model, device=device), str(vae_dir_or_model)
    vae = vae_dir_or_model
    if device is not None:
        vae.to(device)
    return vae, getattr(vae.config, "_name_or_path", None) or None


@torch.no_grad()
def encode_folder(vae_dir_or_model: str | Path | Any, data_dir: str | Path, out_dir: str | Path,
                  batch_size: int = 64, shard_size: int = 4096, split: str | None = None, mode: str = "mean",
                  dtype: str = "float32", seed: int = 0, device: str | torch.device | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """Encode every image of an image folder (optionally one split) into a sharded latent cache.

    `mode`: "mean" (posterior mean, deterministic: the default), "mean_logvar" (mean plus log-variance,
    so training can re-sample), or "sample" (one draw with a generator seeded by `seed`). A VQModel writes
    its codes instead (int64 (N, h, w), index "kind": "codes"; `dtype` does not apply), and only with "mean":
    nearest-code lookup has no posterior to sample. Returns the index.json contents."""
    from tqdm.auto import tqdm

    if mode not in MODES:
        raise InvalidInput(f"mode must be one of {list(MODES)}, got {mode!r}")
    if dtype not in DTYPES:
        raise InvalidInput(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if batch_size <= 0 or shard_size <= 0:
        raise InvalidInput("batch_size and shard_size must be positive")
    vae, vae_path = _vae_and_path(vae_dir_or_model, device)
    codes = is_vq(vae)
    if codes and mode != "mean":
        raise InvalidInput(f"mode {mode!r} needs an AutoencoderKL's posterior; a VQModel's codes are its nearest "
                           "codebook entries, one deterministic answer: use mode 'mean'")
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
    writer = ShardWriter(out, shard_size, torch.int64 if codes else DTYPES[dtype], mode)
    latent_shape: list[int] | None = None
    bar = tqdm(total=len(dataset), disable=not progress, desc="encode", unit="img", dynamic_ncols=True)
    for batch in dataset.batches(batch_size):  # unreadable images are skipped and counted
        x = batch["image"].to(vae.device)
        logvar = None
        if mode == "mean_logvar":
            posterior = vae.encode(x.to(vae.dtype)).latent_dist
            z = (posterior.mean - shift) * scale
            logvar = (posterior.logvar + 2 * float(np.log(abs(scale)))).float().cpu()
        else:
            z = encode(vae, x, sample=mode == "sample", generator=gen if mode == "sample" else None)
        latent_shape = list(z.shape[1:])
        rows = [{"index": i, "text": t, "meta": m} for i, t, m in zip(batch["index"].tolist(), batch["text"],
                                                                      batch["meta"])]
        writer.add(z.cpu() if codes else z.float().cpu(), batch["index"], rows, logvar)
        bar.update(len(batch["index"]))
    shards = writer.close()
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
    index = {"format": "tmot-latents/1", "kind": "codes" if codes else "latents", "shards": shards,
             "count": sum(s["count"] for s in shards), "latent_shape": latent_shape,
             "dtype": "int64" if codes else dtype, "mode": mode, "normalized": not codes,
             **({"codebook_size": codebook_size(vae)} if codes else {}),
             "vae": str(Path(vae_path).resolve()) if vae_path and Path(vae_path).exists() else vae_path,
             "scaling_factor": scale, "shift_factor": shift, "image_size": size,
             "data_dir": str(Path(data_dir).resolve()), "split": split, "skipped_images": dataset.skipped}
    atomic_write_bytes(out / INDEX_FILE, (json.dumps(index, indent=2) + "\n").encode())
    return index


__all__ = ["DTYPES", "MODES", "encode_folder"]
