"""Feature spaces of the distribution metrics: a network with the preprocessing that belongs to it.

Why one type: FID, FD-DINOv2, KID and precision/recall/density/coverage are all statistics of per-image
features; what differs is the network and how an image is resized and normalised before it. A
:class:`FeatureExtractor` carries both, plus the identity every number and statistics file records (the
feature space, the network, its weights' sha256, the resize and resolution), so features made two ways
are never mixed. One pass over a folder gives features that every metric of that space shares.

The spaces:

- ``inception``: clean-fid's "clean" mode (uint8 image, PIL bicubic resize of each channel in float to
  299 x 299, values in [0, 255]), NVIDIA's TorchScript Inception, 2048-d pool features (FID, KID).
- ``dinov2``: dgm-eval's (Stein et al. 2023): torchvision's bicubic resize of the PIL image to 224 x 224,
  [0, 1], ImageNet mean/std, the DINOv2 ViT-L/14 class token after the final norm, here from timm
  (``eval.dinov2``).
- ``clip``: the CLIP image embedding as CMMD makes it: bicubic resize of the whole image to the model's
  input size, the model's own mean/std, L2-normalised.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transfusion_mot.common.errors import InvalidInput
from transfusion_mot.common.images import to_uint8_array

from .images import SkipCounter, iter_loaded, list_images

SPACES = ("inception", "dinov2", "clip")
CLEAN_MODE = "clean"
INCEPTION_RESOLUTION = 299
CLEAN_PREPROCESSING = "clean-fid 'clean': PIL bicubic resize of each channel in float to 299x299, values in [0, 255]"

# a bare extractor (an Inception stand-in) maps (N, 3, 299, 299) floats in [0, 255] to (N, D) features
Extractor = Callable[[torch.Tensor], Any]
ImageSource = str | os.PathLike | Sequence[Any]


@dataclass
class FeatureExtractor:
    """A feature network and the preprocessing that belongs to it.

    ``preprocess`` maps one uint8 (H, W, 3) image to float32 (3, R, R) (it runs in threads, so it must be
    thread-safe); ``net`` maps a batch of those to (N, D) features. ``identity`` names the network and its
    weights' sha256; ``mode``, ``resolution`` and ``preprocessing`` say how images reach it."""

    space: str
    net: Callable[[torch.Tensor], Any]
    preprocess: Callable[[np.ndarray], np.ndarray]
    identity: dict[str, str]
    mode: str
    resolution: int
    preprocessing: str
    module: torch.nn.Module | None = None  # the network as a module, where it is one (to inspect or move it)

    def describe(self) -> dict[str, Any]:
        """What a result or statistics file records of these features."""
        return {"features": self.space, **self.identity, "mode": self.mode, "resolution": self.resolution,
                "preprocessing": self.preprocessing}


@lru_cache(maxsize=1)
def clean_resizer() -> Callable[[np.ndarray], np.ndarray]:
    """clean-fid's "clean" resize: uint8 (H, W, 3) -> float32 (299, 299, 3) in [0, 255]."""
    from cleanfid.resize import build_resizer

    return build_resizer(CLEAN_MODE)


def clean_chw(image: np.ndarray) -> np.ndarray:
    """One image in clean-fid's "clean" preprocessing, channels first."""
    return clean_resizer()(image).transpose(2, 0, 1)


def module_sha256(module: torch.nn.Module, name: str = "") -> str:
    """sha256 of a module's state dict (names, dtypes, shapes, values), for weights that have no single file."""
    h = hashlib.sha256(name.encode())
    for key, value in sorted(module.state_dict().items()):
        t = value.detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def extractor_identity(extractor: Extractor) -> dict[str, str]:
    """Name and sha256 that identify a bare extractor in results and stats files.

    One with ``describe()`` (the Inception wrapper: its weights file's hash) says itself; any other torch
    module is hashed by its state dict; a plain function by its qualified name."""
    if hasattr(extractor, "describe"):
        return dict(extractor.describe())
    name = getattr(extractor, "original_name", None) or type(extractor).__name__
    if isinstance(extractor, (torch.nn.Module, torch.jit.ScriptModule)):
        return {"extractor": f"module:{name}", "extractor_sha256": module_sha256(extractor, name)}
    qualname = f"{getattr(extractor, '__module__', '?')}.{getattr(extractor, '__qualname__', name)}"
    return {"extractor": f"callable:{qualname}", "extractor_sha256": hashlib.sha256(qualname.encode()).hexdigest()}


def inception_space(extractor: Extractor) -> FeatureExtractor:
    """An Inception network (or a stand-in with its interface) with clean-fid's preprocessing."""
    return FeatureExtractor("inception", extractor, clean_chw, extractor_identity(extractor), CLEAN_MODE,
                            INCEPTION_RESOLUTION, CLEAN_PREPROCESSING,
                            extractor if isinstance(extractor, torch.nn.Module) else None)


def as_feature_extractor(extractor: FeatureExtractor | Extractor) -> FeatureExtractor:
    """A FeatureExtractor as it is; a bare callable as the Inception space's network."""
    return extractor if isinstance(extractor, FeatureExtractor) else inception_space(extractor)


def check_space(space: str) -> str:
    """The name of a feature space, or a one-line error listing them."""
    if space not in SPACES:
        raise InvalidInput(f"unknown feature space {space!r}: choose one of {', '.join(SPACES)}")
    return space


def clip_space(bundle: Any) -> FeatureExtractor:
    """CLIP image embeddings as CMMD makes them (bicubic resize of the whole image, L2-normalised)."""
    from .clip import embed_pixels, squash_pixels

    size = bundle.image_size

    def preprocess(image: np.ndarray) -> np.ndarray:
        return squash_pixels(bundle, [image])[0].numpy()

    identity = {"extractor": f"clip:{bundle.model_id}", "extractor_sha256": module_sha256(bundle.model)}
    return FeatureExtractor("clip", lambda x: embed_pixels(bundle, x), preprocess, identity, "clip-squash", size,
                            f"bicubic resize of the whole image to {size}x{size} (no crop), CLIP mean/std; "
                            "L2-normalised image embedding", bundle.model)


# --------------------------------------------------------------------------------------------------
# extraction


@torch.no_grad()
def _run_net(extractor: FeatureExtractor, batch: list[np.ndarray], device: str | torch.device) -> np.ndarray:
    x = torch.from_numpy(np.stack(batch)).to(device)
    features = extractor.net(x)
    if isinstance(features, torch.Tensor):
        features = features.detach().float().cpu().numpy()
    features = np.asarray(features)
    return features.reshape(features.shape[0], -1)


def _batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def extract_features(images: Iterable[Any], extractor: FeatureExtractor | Extractor, batch_size: int = 32,
                     device: str | torch.device = "cpu", workers: int = 0) -> np.ndarray:
    """Features (N, D) of images (PIL or uint8 arrays), preprocessed as the space says, batched.

    ``workers`` > 0 preprocesses each batch in that many threads (PIL releases the GIL): worth it when the
    network runs on a GPU and the per-image resize becomes the bottleneck."""
    extractor = as_feature_extractor(extractor)

    def prepare(image: Any) -> np.ndarray:
        return extractor.preprocess(to_uint8_array(image))

    chunks = []
    with ThreadPoolExecutor(workers) if workers > 0 else nullcontext() as pool:
        for batch in _batched(images, batch_size):
            arrays = list(pool.map(prepare, batch)) if pool else [prepare(im) for im in batch]
            chunks.append(_run_net(extractor, arrays, device))
    if not chunks:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(chunks)


@dataclass
class FeatureSet:
    """Features of one image source plus what was skipped reading it."""

    features: np.ndarray
    source: str
    skipped: SkipCounter = field(default_factory=SkipCounter)
    seconds: float = 0.0

    @property
    def n(self) -> int:
        return int(self.features.shape[0])


def features_of(source: ImageSource, extractor: FeatureExtractor | Extractor, batch_size: int = 32,
                device: str | torch.device = "cpu", max_images: int | None = None, workers: int = 0) -> FeatureSet:
    """Features of a folder (recursive), a list of image paths, or a list of in-memory images; unreadable
    files are skipped and counted."""
    t0 = time.perf_counter()
    skipped = SkipCounter()
    if isinstance(source, (str, os.PathLike)):
        paths = list_images(source)[:max_images]
        images: Iterable[Any] = (array for _, array in iter_loaded(paths, skipped))
        desc = str(source)
    else:
        items = list(source)[:max_images]
        if items and isinstance(items[0], (str, os.PathLike)):
            images = (array for _, array in iter_loaded([Path(p) for p in items], skipped))
            desc = f"{len(items)} files under {os.path.commonpath([os.path.abspath(p) for p in items])}"
        else:
            images, desc = items, f"{len(items)} images in memory"
    features = extract_features(images, extractor, batch_size, device, workers)
    return FeatureSet(features, desc, skipped, time.perf_counter() - t0)
