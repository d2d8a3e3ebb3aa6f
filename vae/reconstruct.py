"""Reconstruction check: originals next to their VAE round trips in one PNG grid, with PSNR.

PSNR is computed per image on the uint8 images a PNG would hold (so it matches what anyone measures on
the saved files), then averaged over images. A VQModel's round trip goes through its codes, and the check
also says how much of the codebook those images use.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from transfusion_mot.common.files import atomic_write_bytes
from transfusion_mot.common.images import image_grid, images_from_tensor
from transfusion_mot.data.imageio import read_metadata
from transfusion_mot.data.readers import ImageFolderReader

from .autoencoder import codebook_size, decode, encode, is_vq, load_vae, psnr_per_image, usage_and_perplexity


def pairs_grid(originals: Tensor, reconstructions: Tensor, pad: int = 2) -> Image.Image:
    """(original | reconstruction) pairs, each pair one cell of an about square grid on white."""
    pairs = []
    for a, b in zip(images_from_tensor(originals), images_from_tensor(reconstructions)):
        pair = Image.new("RGB", (2 * a.width + pad, a.height), (255, 255, 255))
        pair.paste(a, (0, 0))
        pair.paste(b, (a.width + pad, 0))
        pairs.append(pair)
    return image_grid(pairs, pad=2 * pad)


@torch.no_grad()
def reconstruct(vae_dir: str | Path | Any, data_dir: str | Path, out_path: str | Path, n: int = 16,
                split: str | None = "val", device: str | torch.device | None = None,
                batch_size: int = 64) -> dict[str, Any]:
    """Round-trip the first `n` images of `split` (posterior mean, or codes for a VQModel -> decode), write the
    side-by-side grid to `out_path`, and return {"psnr", "psnr_per_image", "n", "grid", "split"}, for a VQModel
    also "codebook_size", "codes_used", "codebook_usage" (codes_used / codebook_size) and "perplexity" of
    these images' codes. A folder without a split column uses all rows; `split=None` always does."""
    vae = load_vae(vae_dir, device=device) if isinstance(vae_dir, (str, Path)) else vae_dir
    vae.eval()
    if split is not None and not any("split" in r for r in read_metadata(data_dir)):
        split = None
    size = int(vae.config.sample_size) if vae.config.sample_size else None
    dataset = ImageFolderReader(data_dir, split=split, size=size)
    n = min(n, len(dataset))
    originals, recons, codes = [], [], []
    for start in range(0, n, batch_size):
        x = dataset.batch(list(range(start, min(n, start + batch_size))))["image"].to(vae.device)
        originals.append(x.float().cpu())
        z = encode(vae, x)
        if is_vq(vae):
            codes.append(z.flatten().cpu())
        recons.append(decode(vae, z).float().clamp(-1, 1).cpu())
    x, y = torch.cat(originals), torch.cat(recons)
    per_image = psnr_per_image(x, y)
    buf = io.BytesIO()
    pairs_grid(x, y).save(buf, format="PNG")
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_path, buf.getvalue())
    result = {"psnr": float(per_image.mean()), "psnr_per_image": [round(float(p), 3) for p in per_image],
              "n": n, "grid": str(out_path), "split": split}
    usage = ""
    if codes:
        counts = torch.bincount(torch.cat(codes), minlength=codebook_size(vae))
        result["codebook_size"], result["codes_used"] = codebook_size(vae), int((counts > 0).sum())
        result["codebook_usage"], result["perplexity"] = (round(v, 4) for v in usage_and_perplexity(counts))
        usage = f"; {result['codes_used']} of {result['codebook_size']} codes used, perplexity {result['perplexity']:.1f}"
    print(f"PSNR {result['psnr']:.2f} dB over {n} {split or 'all'} images{usage}; grid: {out_path}")
    return result


@torch.no_grad()
def evaluate_psnr(vae: Any, dataset: ImageFolderReader, batch_size: int = 128) -> float:
    """Mean per-image PSNR (uint8 scale) of the whole dataset's round trips (for held-out evaluation); a VQModel's
    go through its codes."""
    vae.eval()
    total, count = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        x = dataset.batch(list(range(start, min(len(dataset), start + batch_size))))["image"].to(vae.device)
        p = psnr_per_image(x, decode(vae, encode(vae, x)).clamp(-1, 1))
        total += float(p.sum())
        count += len(p)
    return total / max(count, 1)
