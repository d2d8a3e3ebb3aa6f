"""CLIP score with transformers' CLIPModel: 100 x mean cosine of image and caption embeddings.

Why not torchmetrics' CLIPScore: with transformers >= 5 ``get_image_features`` returns an output
object instead of a tensor, which breaks it; here both forms are handled. Scale conventions differ
between papers (Transfusion reports x100, MoT the raw cosine), so every result records the scale
and the model id, and carries the raw cosine too.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from transfusion_mot.common.errors import InputNotFound, InvalidInput
from transfusion_mot.common.images import to_pil
from transfusion_mot.data.imageio import BadImage, load_rgb

from .images import SkipCounter

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
CLIP_SCALE = 100.0


class ClipModelNotFound(InputNotFound):
    """A CLIP model directory that does not exist, or a hub id that cannot be loaded (offline)."""


@dataclass
class ClipBundle:
    """A loaded CLIP model with its processor and the id it was loaded from."""

    model: Any
    processor: Any
    model_id: str
    device: torch.device

    @property
    def image_size(self) -> int:
        return int(self.model.config.vision_config.image_size)


def _looks_local(name: str) -> bool:
    """A path rather than a hub id ("org/name")."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def load_clip(model: str | os.PathLike = DEFAULT_CLIP_MODEL, device: str | torch.device = "cpu",
              local_files_only: bool | None = None) -> ClipBundle:
    """CLIPModel + CLIPProcessor from a local directory (``save_pretrained`` layout) or a hub id."""
    from transformers import CLIPModel, CLIPProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bars in CLI output
    name = str(model)
    local = Path(name).expanduser()
    if _looks_local(name) and not local.exists():
        raise ClipModelNotFound(f"CLIP model directory not found: {local}")
    if local.exists() and not (local / "config.json").is_file():
        raise ClipModelNotFound(f"{local} is not a CLIP model directory (no config.json; save one with save_pretrained)")
    kwargs: dict[str, Any] = {}
    if local_files_only is not None:
        kwargs["local_files_only"] = local_files_only
    source = str(local) if local.exists() else name
    try:
        clip = CLIPModel.from_pretrained(source, **kwargs)
        processor = CLIPProcessor.from_pretrained(source, **kwargs)
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ClipModelNotFound(
            f"could not load CLIP model {name!r} ({first[:160]}); offline? pass a local directory saved with "
            "save_pretrained (--clip-model DIR), or download it once with network access") from None
    device = torch.device(device)
    return ClipBundle(clip.to(device).eval(), processor, name, device)


def _as_embedding(output: Any, kind: str) -> torch.Tensor:
    """get_*_features returns a tensor (transformers < 5) or an output object whose pooler_output
    is the projected embedding (transformers >= 5)."""
    if isinstance(output, torch.Tensor):
        return output
    for attr in (f"{kind}_embeds", "pooler_output"):
        value = getattr(output, attr, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"unexpected CLIP {kind} feature output: {type(output).__name__}")


def squash_pixels(bundle: ClipBundle, images: Sequence[Any]) -> torch.Tensor:
    """CMMD's preprocessing: bicubic resize of the whole image to the model's input size (no crop), then the
    processor's rescale and mean/std: (N, 3, S, S) float32."""
    size = bundle.image_size
    pils = [to_pil(im).resize((size, size), Image.Resampling.BICUBIC) for im in images]
    inputs = bundle.processor(images=pils, return_tensors="pt", do_resize=False, do_center_crop=False)
    return inputs["pixel_values"]


@torch.no_grad()
def embed_pixels(bundle: ClipBundle, pixel_values: torch.Tensor) -> torch.Tensor:
    """L2-normalised image embeddings (N, D), float32 on the CPU, of processed pixels."""
    emb = bundle.model.get_image_features(pixel_values=pixel_values.to(bundle.device, dtype=bundle.model.dtype))
    return F.normalize(_as_embedding(emb, "image").float(), dim=-1).cpu()


@torch.no_grad()
def image_embeddings(bundle: ClipBundle, images: Sequence[Any], batch_size: int = 32, squash: bool = False) -> torch.Tensor:
    """L2-normalised image embeddings (N, D), float32 on the CPU.

    ``squash=False``: the processor's own resize + centre crop (CLIP score convention).
    ``squash=True``: bicubic resize of the whole image to the model's input size, no crop (CMMD's).
    """
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        if squash:
            pixel_values = squash_pixels(bundle, batch)
        else:
            pixel_values = bundle.processor(images=[to_pil(im) for im in batch], return_tensors="pt")["pixel_values"]
        out.append(embed_pixels(bundle, pixel_values))
    return torch.cat(out) if out else torch.zeros(0, bundle.model.config.projection_dim)


@torch.no_grad()
def text_embeddings(bundle: ClipBundle, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """L2-normalised text embeddings (N, D); captions longer than the context are truncated."""
    max_length = int(bundle.model.config.text_config.max_position_embeddings)
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = bundle.processor(text=list(texts[start:start + batch_size]), return_tensors="pt", padding=True,
                                  truncation=True, max_length=max_length)
        tokens = {k: v.to(bundle.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        emb = _as_embedding(bundle.model.get_text_features(**tokens), "text")
        out.append(F.normalize(emb.float(), dim=-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, bundle.model.config.projection_dim)


def _pair_cosines(bundle: ClipBundle, images: Sequence[Any], captions: Sequence[str], batch_size: int) -> torch.Tensor:
    return (image_embeddings(bundle, images, batch_size) * text_embeddings(bundle, captions, batch_size)).sum(-1)


def _summary(cos: torch.Tensor, bundle: ClipBundle, per_image: bool) -> dict[str, Any]:
    cos64 = cos.double().numpy()
    result = {"clip_score": float(CLIP_SCALE * cos64.mean()), "clip_cosine": float(cos64.mean()),
              "clip_cosine_std": float(cos64.std()), "scale": CLIP_SCALE, "n": len(cos64), "model": bundle.model_id}
    if per_image:
        result["per_image_cosine"] = [round(float(c), 6) for c in cos64]
    return result


def clip_score(clip: ClipBundle | str | os.PathLike, images: Sequence[Any], captions: Sequence[str],
               batch_size: int = 32, device: str | torch.device = "cpu", per_image: bool = False) -> dict[str, Any]:
    """CLIP score = 100 x mean over pairs of cos(image_i, caption_i); ``clip_cosine`` is the raw mean."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    if not images:
        raise InvalidInput("no images to score")
    bundle = clip if isinstance(clip, ClipBundle) else load_clip(clip, device)
    return _summary(_pair_cosines(bundle, images, captions, batch_size), bundle, per_image)


def clip_score_files(clip: ClipBundle | str | os.PathLike, paths: Sequence[str | os.PathLike], captions: Sequence[str],
                     batch_size: int = 32, device: str | torch.device = "cpu") -> dict[str, Any]:
    """CLIP score of image files and their captions, decoded a batch at a time (30k images never
    sit in memory); an unreadable file is skipped with its caption and counted."""
    if len(paths) != len(captions):
        raise ValueError(f"{len(paths)} images but {len(captions)} captions")
    bundle = clip if isinstance(clip, ClipBundle) else load_clip(clip, device)
    skipped = SkipCounter()
    cosines = []
    for start in range(0, len(paths), batch_size):
        images, texts = [], []
        for path, caption in zip(paths[start:start + batch_size], captions[start:start + batch_size]):
            try:
                images.append(np.asarray(load_rgb(path, max_pixels=None)))
                texts.append(caption)
            except BadImage as err:
                skipped.add(err)
        if images:
            cosines.append(_pair_cosines(bundle, images, texts, batch_size))
    if not cosines:
        raise InvalidInput(f"no readable images to score ({skipped.total} unreadable)")
    result = _summary(torch.cat(cosines), bundle, per_image=False)
    result["skipped"] = skipped.as_dict()
    return result


__all__ = [
    "CLIP_SCALE",
    "DEFAULT_CLIP_MODEL",
    "ClipBundle",
    "ClipModelNotFound",
    "clip_score",
    "clip_score_files",
    "embed_pixels",
    "image_embeddings",
    "load_clip",
    "squash_pixels",
    "text_embeddings",
]
