"""Reconstruction check: originals next to their VAE round trips in one PNG grid, with PSNR.

PSNR is computed per image on the uint8 images a PNG would hold (so it matches what anyone measures on
the saved files), then averaged over images.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .autoencoder import decode, encode, load_vae, psnr_per_image, to_uint8
from .data import ImageFolderDataset, read_metadata


def make_grid(originals: Tensor, reconstructions: Tensor, pad: int = 2) -> Tensor:
    """uint8 (H, W, 3) grid of (original | reconstruction) pairs, about square, white padding."""
    n, _, h, w = originals.shape
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    cell_w, cell_h = 2 * w + 3 * pad, h + 2 * pad
    grid = torch.full((rows * cell_h + pad, cols * cell_w + pad, 3), 255, dtype=torch.uint8)
    a = to_uint8(originals).to(torch.uint8).permute(0, 2, 3, 1)
    b = to_uint8(reconstructions).to(torch.uint8).permute(0, 2, 3, 1)
    for k in range(n):
        r, c = divmod(k, cols)
        y, x = r * cell_h + 2 * pad, c * cell_w + 2 * pad
        grid[y:y + h, x:x + w] = a[k]
        grid[y:y + h, x + w + pad:x + 2 * w + pad] = b[k]
    return grid


def save_png(array: Tensor, path: str | Path) -> None:
    """Atomic PNG write (temp file + rename)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.stem}-", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        Image.fromarray(array.numpy()).save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@torch.no_grad()
def reconstruct(vae_dir: str | Path | Any, data_dir: str | Path, out_path: str | Path, n: int = 16,
                split: str | None = "val", device: str | torch.device | None = None,
                batch_size: int = 64) -> dict[str, Any]:
    """Round-trip the first `n` images of `split` (posterior mean -> decode), write the side-by-side grid
    to `out_path`, and return {"psnr", "psnr_per_image", "n", "grid", "split"}. A folder without a split
    column uses all rows; `split=None` always does."""
    vae = load_vae(vae_dir, device=device) if isinstance(vae_dir, (str, Path)) else vae_dir
    vae.eval()
    if split is not None and not any("split" in r for r in read_metadata(data_dir)):
        split = None
    size = int(vae.config.sample_size) if vae.config.sample_size else None
    dataset = ImageFolderDataset(data_dir, split=split, size=size)
    n = min(n, len(dataset))
    originals, recons = [], []
    for start in range(0, n, batch_size):
        x = dataset.batch(list(range(start, min(n, start + batch_size))))["image"].to(vae.device)
        originals.append(x.float().cpu())
        recons.append(decode(vae, encode(vae, x)).float().clamp(-1, 1).cpu())
    x, y = torch.cat(originals), torch.cat(recons)
    per_image = psnr_per_image(x, y)
    save_png(make_grid(x, y), out_path)
    result = {"psnr": float(per_image.mean()), "psnr_per_image": [round(float(p), 3) for p in per_image],
              "n": n, "grid": str(out_path), "split": split}
    print(f"PSNR {result['psnr']:.2f} dB over {n} {split or 'all'} images; grid: {out_path}")
    return result


@torch.no_grad()
def evaluate_psnr(vae: Any, dataset: ImageFolderDataset, batch_size: int = 128) -> float:
    """Mean per-image PSNR (uint8 scale) of the whole dataset's round trips (for held-out evaluation)."""
    vae.eval()
    total, count = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        x = dataset.batch(list(range(start, min(len(dataset), start + batch_size))))["image"].to(vae.device)
        p = psnr_per_image(x, decode(vae, encode(vae, x)).clamp(-1, 1))
        total += float(p.sum())
        count += len(p)
    return total / max(count, 1)
