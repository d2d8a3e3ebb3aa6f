"""Precision, recall (Kynkäänniemi et al. 2019) and density, coverage (Naeem et al. 2020) of generated images.

Why apart from FID: one distance mixes fidelity and diversity; these four separate them. Precision is the
share of fake images inside the real manifold (the union of balls around each real feature reaching its
k-th nearest real neighbour), recall the share of real images inside the fake manifold; density counts how
many real balls hold each fake image (over k: about 1 when the two sets match, above 1 when fakes crowd
dense regions), coverage the share of real balls holding at least one fake image.

The definitions are the ``prdc`` package's (Naeem et al.'s own code), strict ``<`` included; the reference
test compares with it. It builds the full N x N distance matrices with scikit-learn; here they are made in
float64 row blocks on any torch device, so 50k x 50k never sits in memory and a GPU does the work. The one
place the two can differ is an exact tie, a fake image at exactly the radius of a real one's ball (duplicate
images): the package compares scikit-learn's float32 distances, with their round-off, these float64 ones.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from transfusion_mot.common.errors import InvalidInput

from .features import FeatureExtractor, ImageSource
from .fid import FeatureStats, stats_pair

DEFAULT_K = 5
BLOCK_ELEMENTS = 1 << 24  # distances per block: 128 MiB of float64


def _distances(a: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    """Euclidean distances (len(a), len(b)) in float64, through |a|^2 + |b|^2 - 2 a.b as scikit-learn does."""
    d2 = (a * a).sum(1, keepdim=True) + b_sq[None, :] - 2.0 * (a @ b.T)
    return d2.clamp_min_(0.0).sqrt_()


def _rows(n_cols: int) -> int:
    """Rows per block of a distance matrix with n_cols columns."""
    return max(1, BLOCK_ELEMENTS // max(n_cols, 1))


def kth_neighbour_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of each row of x to its k-th nearest other row (the row itself is the 0-th, at distance 0)."""
    x_sq = (x * x).sum(1)
    radii = torch.empty(len(x), dtype=x.dtype, device=x.device)
    step = _rows(len(x))
    for start in range(0, len(x), step):
        d = _distances(x[start:start + step], x, x_sq)
        rows = torch.arange(start, min(start + step, len(x)), device=x.device)
        d[rows - start, rows] = 0.0  # the expansion leaves ~1e-8 on the diagonal; a point is at 0 from itself
        radii[start:start + step] = d.topk(k + 1, dim=1, largest=False).values[:, -1]
    return radii


def prdc(real_features: np.ndarray, fake_features: np.ndarray, k: int = DEFAULT_K,
         device: str | torch.device = "cpu") -> dict[str, float]:
    """Precision, recall, density and coverage of fake features against real ones, with k-NN balls."""
    if k < 1:
        raise InvalidInput(f"k must be at least 1, got {k}")
    if torch.device(device).type == "mps":  # no float64 there; the distances are cheap next to the features
        device = "cpu"
    real = torch.as_tensor(np.asarray(real_features), dtype=torch.float64, device=device)
    fake = torch.as_tensor(np.asarray(fake_features), dtype=torch.float64, device=device)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise InvalidInput(f"expected two (n, d) feature arrays of the same d, got {tuple(real.shape)} and "
                           f"{tuple(fake.shape)}")
    for name, x in (("real", real), ("fake", fake)):
        if len(x) <= k:
            raise InvalidInput(f"precision/recall with k={k} need more than {k} {name} images, got {len(x)}")
        if not torch.isfinite(x).all():
            raise InvalidInput(f"the {name} features hold non-finite values")
    real_radii = kth_neighbour_radii(real, k)
    fake_radii = kth_neighbour_radii(fake, k)
    fake_sq = (fake * fake).sum(1)
    balls_per_fake = torch.zeros(len(fake), dtype=torch.int64, device=real.device)
    real_recalled = torch.zeros(len(real), dtype=torch.bool, device=real.device)
    real_covered = torch.zeros(len(real), dtype=torch.bool, device=real.device)
    step = _rows(len(fake))
    for start in range(0, len(real), step):
        d = _distances(real[start:start + step], fake, fake_sq)  # (rows of real, all fakes)
        radii = real_radii[start:start + step, None]
        balls_per_fake += (d < radii).sum(0)
        real_recalled[start:start + step] = (d < fake_radii[None, :]).any(1)
        real_covered[start:start + step] = d.min(1).values < radii[:, 0]
    return {"precision": float((balls_per_fake > 0).double().mean()),
            "recall": float(real_recalled.double().mean()),
            "density": float(balls_per_fake.double().sum() / (k * len(fake))),
            "coverage": float(real_covered.double().mean())}


def prdc_note(k: int) -> str:
    """What the numbers depend on, said next to them."""
    return f"k={k} nearest neighbours; all four depend on n and k: compare only at equal image counts and k"


def prdc_of_stats(real: FeatureStats, fake: FeatureStats, k: int = DEFAULT_K,
                  device: str | torch.device = "cpu") -> dict[str, Any]:
    """PRDC of two statistics of one feature space; both must carry their features."""
    for name, stats in (("real", real), ("fake", fake)):
        if stats.features is None:
            raise InvalidInput(f"the {name} statistics ({stats.source}) were saved without their features; "
                               "precision/recall need them (save statistics with features, the default)")
    return {**prdc(real.features, fake.features, k, device), "k": k, "features": real.space}


def compute_prdc(real: ImageSource | FeatureStats, fake: ImageSource | FeatureStats,
                 extractor: FeatureExtractor | None = None, *, features: str | None = None,
                 model: str | os.PathLike | None = None, inception: str | os.PathLike | None = None,
                 k: int = DEFAULT_K, batch_size: int = 32,
                 device: str | torch.device = "cpu", max_images: int | None = None, allow_download: bool = False,
                 workers: int = 0) -> dict[str, Any]:
    """Precision, recall, density and coverage between two sources (folders, file lists, images, or
    statistics files with features) in one feature space (default: a statistics file's own, else DINOv2)."""
    t0 = time.perf_counter()
    pair = stats_pair(real, fake, extractor, features=features, default_space="dinov2", model=model,
                      inception=inception, batch_size=batch_size, device=device, max_images=max_images,
                      allow_download=allow_download, workers=workers)
    result = prdc_of_stats(pair.real, pair.fake, k, device)
    result.update({**pair.counts(), "note": prdc_note(k), "seconds": round(time.perf_counter() - t0, 2)})
    return result


__all__: Sequence[str] = ["DEFAULT_K", "compute_prdc", "kth_neighbour_radii", "prdc", "prdc_of_stats"]
