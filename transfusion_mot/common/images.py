"""Images in memory, for every package: conversions to PIL and uint8 arrays, decoded tensors, grids. (Image
files and folders of them: `transfusion_mot.data.imageio`.)"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from .errors import InvalidInput


def to_uint8_array(image: Any) -> np.ndarray:
    """PIL image, uint8 array (H, W, 3) or (3, H, W), or uint8 torch tensor -> uint8 (H, W, 3).

    Float arrays are refused rather than guessed ([0, 1] or [0, 255]?): convert them explicitly (tensors in
    [-1, 1], as the VAE decodes them, with `images_from_tensor`)."""
    if isinstance(image, Image.Image):
        return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    if hasattr(image, "detach") and hasattr(image, "cpu"):  # torch tensor
        image = image.detach().cpu().numpy()
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise InvalidInput(f"expected a PIL image or a uint8 array, got an array of {array.dtype}; "
                           "convert with (x * 255).round().clip(0, 255).astype(np.uint8)")
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[2] not in (1, 3):
        array = array.transpose(1, 2, 0)
    if array.ndim != 3 or array.shape[2] not in (1, 3):
        raise InvalidInput(f"expected an image of shape (H, W, 3) or (3, H, W), got {array.shape}")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return np.ascontiguousarray(array)


def to_pil(image: Any) -> Image.Image:
    """One image (see `to_uint8_array`) as an RGB PIL image."""
    if isinstance(image, Image.Image) and image.mode == "RGB":
        return image
    return Image.fromarray(to_uint8_array(image), "RGB")


def images_from_tensor(images: Any) -> list[Image.Image]:
    """(N, 3, H, W) floats in about [-1, 1] (what the VAE decodes) -> RGB PIL images."""
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def image_grid(images: Sequence[Any], cols: int | None = None, pad: int = 2, cell: int | None = None,
               background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Images tiled row-major, `pad` pixels apart on `background`; with `cell`, each resized to cell x cell
    (bicubic), else all must share the first image's size. cols default: about square."""
    if not images:
        raise InvalidInput("no images for a grid")
    pils = [to_pil(im) for im in images]
    cols = cols or math.ceil(math.sqrt(len(pils)))
    rows = math.ceil(len(pils) / cols)
    w, h = (cell, cell) if cell else pils[0].size
    grid = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), background)
    for i, im in enumerate(pils):
        if im.size != (w, h):
            im = im.resize((w, h), Image.Resampling.BICUBIC)
        grid.paste(im, (pad + (i % cols) * (w + pad), pad + (i // cols) * (h + pad)))
    return grid


__all__ = ["image_grid", "images_from_tensor", "to_pil", "to_uint8_array"]
