"""Frechet distance (FID, FD-DINOv2, ...) and KID, with statistics that know where they came from.

In the Inception space the computation is clean-fid's "clean" mode, step by step: decode to uint8 RGB,
resize each channel in float with PIL bicubic to 299 x 299 (clean-fid's own ``build_resizer("clean")``),
feed [0, 255] floats to the extractor, take float64 mean and covariance, and the Frechet distance through
the eigenvalues below. Other feature spaces (``eval.features``: DINOv2 through timm, CLIP) change only the
network and its preprocessing. What is added around it: any image source (folder, file list, in-memory
images, a sampling function), corrupt files skipped and counted instead of crashing a 30k-image run, and
``.npz`` statistics that carry the feature space, the extractor's sha256 and the preprocessing (and the
features, for KID and precision/recall), so a reference computed another way is refused instead of
silently giving a wrong number.
"""

from __future__ import annotations

import datetime
import json
import os
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transfusion_mot.common.errors import InputNotFound, InvalidInput

from .features import (
    CLEAN_MODE,
    INCEPTION_RESOLUTION,
    Extractor,
    FeatureExtractor,
    FeatureSet,
    ImageSource,
    as_feature_extractor,
    check_space,
    clip_space,
    extract_features,
    features_of,
    inception_space,
)
from .images import split_batch

STATS_FORMAT = "tmot-fid-stats/1"
AnyExtractor = FeatureExtractor | Extractor


class StatsNotFound(InputNotFound):
    """A reference statistics file that does not exist."""


class StatsMismatch(InvalidInput):
    """Reference statistics computed in another feature space, with another extractor or preprocessing."""


# --------------------------------------------------------------------------------------------------
# statistics


@dataclass
class FeatureStats:
    """Gaussian statistics of features (float64) plus where they came from; optionally the features
    themselves (KID and precision/recall/density/coverage need them)."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    extractor: str
    extractor_sha256: str | None
    source: str = ""
    mode: str = CLEAN_MODE
    resolution: int = INCEPTION_RESOLUTION
    features: np.ndarray | None = None
    created: str = ""
    space: str = "inception"
    preprocessing: str = ""

    @classmethod
    def from_features(cls, fs: FeatureSet, extractor: FeatureExtractor) -> FeatureStats:
        if fs.n < 2:
            raise InvalidInput(f"need at least 2 readable images for feature statistics, got {fs.n} from {fs.source}"
                               + (f" ({fs.skipped.total} skipped as unreadable)" if fs.skipped.total else ""))
        feats = fs.features.astype(np.float64)
        return cls(mu=np.mean(feats, axis=0), sigma=np.cov(feats, rowvar=False), n=fs.n,
                   extractor=extractor.identity["extractor"], extractor_sha256=extractor.identity["extractor_sha256"],
                   source=fs.source, mode=extractor.mode, resolution=extractor.resolution, features=fs.features,
                   created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   space=extractor.space, preprocessing=extractor.preprocessing)

    def meta(self) -> dict[str, Any]:
        return {"format": STATS_FORMAT, "features": self.space, "n": self.n, "extractor": self.extractor,
                "extractor_sha256": self.extractor_sha256, "mode": self.mode, "resolution": self.resolution,
                "preprocessing": self.preprocessing, "source": self.source, "feature_dim": int(self.mu.shape[0]),
                "created": self.created}

    def describe(self) -> dict[str, Any]:
        """What a result records of these features (as :meth:`FeatureExtractor.describe` for a network)."""
        return {"features": self.space, "extractor": self.extractor, "extractor_sha256": self.extractor_sha256,
                "mode": self.mode, "resolution": self.resolution, "preprocessing": self.preprocessing}

    def save(self, path: str | os.PathLike, include_features: bool = True) -> Path:
        """Write ``mu``, ``sigma`` (clean-fid's key names), ``meta`` (JSON) and optionally ``feats``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"mu": self.mu, "sigma": self.sigma, "meta": np.array(json.dumps(self.meta()))}
        if include_features and self.features is not None:
            arrays["feats"] = self.features
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        """Read a stats file written by :meth:`save` (or a bare clean-fid ``mu``/``sigma`` file: Inception
        features whose extractor is unknown, recorded as None)."""
        path = Path(path)
        if not path.is_file():
            raise StatsNotFound(f"reference statistics not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise InvalidInput(f"{path} is not a statistics .npz file: {type(err).__name__}: {err}") from None
        if "mu" not in arrays or "sigma" not in arrays:
            raise InvalidInput(f"{path} lacks 'mu' and 'sigma' arrays: not feature statistics")
        mu, sigma = arrays["mu"].astype(np.float64), arrays["sigma"].astype(np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise InvalidInput(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not fit together")
        meta = json.loads(str(arrays["meta"])) if "meta" in arrays else {}
        feats = arrays.get("feats")
        return cls(mu=mu, sigma=sigma, n=int(meta.get("n", feats.shape[0] if feats is not None else 0)),
                   extractor=meta.get("extractor", "unknown"), extractor_sha256=meta.get("extractor_sha256"),
                   source=meta.get("source", str(path)), mode=meta.get("mode", CLEAN_MODE),
                   resolution=int(meta.get("resolution", INCEPTION_RESOLUTION)), features=feats,
                   created=meta.get("created", ""), space=meta.get("features", "inception"),
                   preprocessing=meta.get("preprocessing", ""))

    @staticmethod
    def read_meta(path: str | os.PathLike) -> dict[str, Any]:
        """A statistics file's metadata alone (its arrays are not read): Inception for a bare clean-fid file."""
        path = Path(path)
        if not path.is_file():
            raise StatsNotFound(f"reference statistics not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as data:
                if "mu" not in data.files or "sigma" not in data.files:
                    raise InvalidInput(f"{path} lacks 'mu' and 'sigma' arrays: not feature statistics")
                meta = json.loads(str(data["meta"])) if "meta" in data.files else {}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            if isinstance(err, InvalidInput):
                raise
            raise InvalidInput(f"{path} is not a statistics .npz file: {type(err).__name__}: {err}") from None
        return {"features": "inception", **meta}

    def check_same_features(self, other: FeatureStats) -> None:
        """Refuse comparing statistics of two kinds of features (space, weights, resize)."""
        mine, theirs = self.describe(), other.describe()
        for key in ("features", "extractor_sha256", "mode", "resolution"):
            if None not in (mine[key], theirs[key]) and mine[key] != theirs[key]:
                raise StatsMismatch(f"{other.source} and {self.source} hold different features ({key} "
                                    f"{str(theirs[key])[:16]} vs {str(mine[key])[:16]}): recompute one of them")

    def check_compatible(self, extractor: FeatureExtractor, what: str = "reference statistics") -> None:
        """Refuse statistics made in another feature space, with other weights or another preprocessing."""
        if self.space != extractor.space:
            raise StatsMismatch(f"{what} ({self.source}) hold {self.space} features, but this run computes "
                                f"{extractor.space} features")
        sha = extractor.identity.get("extractor_sha256")
        if self.extractor_sha256 is not None and sha is not None and self.extractor_sha256 != sha:
            raise StatsMismatch(f"{what} ({self.source}) were computed with extractor sha256 {self.extractor_sha256[:12]}… "
                                f"but this run uses {sha[:12]}… ({extractor.identity.get('extractor')}); recompute "
                                f"them with the same weights (tmot eval fd --features {extractor.space} --real DIR "
                                "--save-stats FILE)")
        if self.mode != extractor.mode or self.resolution != extractor.resolution:
            raise StatsMismatch(f"{what} ({self.source}) use mode {self.mode!r} at {self.resolution} px; this run "
                                f"computes mode {extractor.mode!r} at {extractor.resolution} px")


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between two Gaussians: |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

    clean-fid takes the trace term from ``scipy.linalg.sqrtm(S1 @ S2)`` (a Schur decomposition of a
    non-symmetric product, with eps on the diagonal when it is singular). The same trace is the sum of
    the square roots of the eigenvalues of the symmetric R S2 R, R = S1^(1/2) (S1 S2 and R S2 R are
    similar): two symmetric eigendecompositions, ~9x faster at 2048 features (2 s instead of 16 s on a
    2-core CPU), no eps needed for rank-deficient covariances (fewer images than features), and equal
    to clean-fid's value to 1e-13 relative with full-rank covariances, ~1e-7 with 100 images (where
    sqrtm of the singular product is the less accurate of the two)."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise InvalidInput(f"feature dimensions differ: {mu1.shape[0]} vs {mu2.shape[0]}")
    if not (np.isfinite(sigma1).all() and np.isfinite(sigma2).all()):
        raise InvalidInput("FID: the feature covariance holds non-finite values")
    diff = mu1 - mu2
    w, v = np.linalg.eigh(sigma1)
    root = (v * np.sqrt(_noise_to_zero(w))) @ v.T  # S1^(1/2)
    trace_covmean = np.sqrt(_noise_to_zero(np.linalg.eigvalsh(root @ sigma2 @ root))).sum()
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_covmean)


def _noise_to_zero(eigenvalues: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with those below its round-off level (and the negative ones it makes)
    set to zero: their square roots would otherwise add up to ~1e-6 of noise for a rank-deficient covariance."""
    cutoff = np.finfo(eigenvalues.dtype).eps * len(eigenvalues) * max(float(np.abs(eigenvalues).max(initial=0)), 0.0)
    return np.where(eigenvalues > cutoff, eigenvalues, 0.0)


def kernel_distance(feats1: np.ndarray, feats2: np.ndarray, num_subsets: int = 100, max_subset_size: int = 1000,
                    seed: int = 0) -> float:
    """KID, clean-fid's definition (cubic polynomial kernel, unbiased MMD² averaged over random
    subsets), computed by clean-fid itself under a seeded NumPy state (restored afterwards)."""
    from cleanfid.fid import kernel_distance as cleanfid_kernel_distance

    if min(feats1.shape[0], feats2.shape[0]) < 2:
        raise InvalidInput("KID needs at least 2 images on each side")
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        return float(cleanfid_kernel_distance(feats1, feats2, num_subsets=num_subsets, max_subset_size=max_subset_size))
    finally:
        np.random.set_state(state)


# --------------------------------------------------------------------------------------------------
# distances between any two sources


def _is_stats_file(source: Any) -> bool:
    return isinstance(source, (str, os.PathLike)) and str(source).endswith(".npz")


def stats_of(source: ImageSource | FeatureStats, extractor: FeatureExtractor, batch_size: int = 32,
             device: str | torch.device = "cpu", max_images: int | None = None,
             what: str = "images", workers: int = 0) -> tuple[FeatureStats, dict[str, Any]]:
    """Statistics of a source (folder, files, images, .npz file or FeatureStats) in ``extractor``'s feature
    space, and a report of how they were obtained (count, skipped files, feature extraction speed)."""
    if isinstance(source, FeatureStats) or _is_stats_file(source):
        stats = source if isinstance(source, FeatureStats) else FeatureStats.load(source)
        stats.check_compatible(extractor, what=f"{what} statistics")
        return stats, {"n": stats.n, "source": stats.source, "from_stats": True}
    fs = features_of(source, extractor, batch_size, device, max_images, workers)
    stats = FeatureStats.from_features(fs, extractor)
    return stats, {"n": fs.n, "source": fs.source, "skipped": fs.skipped.as_dict(), "seconds": round(fs.seconds, 2),
                   "images_per_s": round(fs.n / fs.seconds, 2) if fs.seconds > 0 else None}


def load_feature_extractor(space: str = "inception", model: str | os.PathLike | None = None,
                           device: str | torch.device = "cpu", allow_download: bool = False) -> FeatureExtractor:
    """The network of a feature space, resolved and hashed.

    ``model``: ``inception``: the TorchScript weights file (default: the lookup of
    :func:`eval.inception.resolve_inception_weights`); ``dinov2``: a timm name, ``hf-hub:ID`` or
    ``local-dir:PATH`` (default ``vit_large_patch14_dinov2.lvd142m``); ``clip``: a CLIP hub id or directory
    (default CMMD's ``openai/clip-vit-large-patch14-336``). Nothing is downloaded without ``allow_download``
    (a hub model already in the Hugging Face cache loads offline)."""
    check_space(space)
    if space == "inception":
        from .inception import load_inception

        return inception_space(load_inception(model, device=device, allow_download=allow_download))
    if space == "dinov2":
        from .dinov2 import DEFAULT_DINOV2_MODEL, load_timm_extractor

        return load_timm_extractor(str(model or DEFAULT_DINOV2_MODEL), device=device, allow_download=allow_download)
    from .clip import load_clip
    from .cmmd import DEFAULT_CMMD_MODEL

    return clip_space(load_clip(model or DEFAULT_CMMD_MODEL, device, local_files_only=None if allow_download else True))


def resolve_extractor(extractor: AnyExtractor | None = None, inception: str | os.PathLike | None = None,
                      device: str | torch.device = "cpu", allow_download: bool = False, *,
                      features: str = "inception", model: str | os.PathLike | None = None) -> FeatureExtractor:
    """The given extractor (a bare callable is an Inception stand-in), or the network of ``features``
    (``model``, or for Inception ``inception``: see :func:`load_feature_extractor`)."""
    if extractor is not None:
        return as_feature_extractor(extractor)
    return load_feature_extractor(features, model if model is not None else inception, device, allow_download)


def small_n_note(space: str) -> str:
    """The bias of a Frechet distance at small n, said next to each number."""
    return ("biased upward at small n, by about c/n_real + c/n_fake with c set by the data and the features "
            f"({space}; several FID points at 1k images): compare only at equal image counts")


def distances(real: FeatureStats, fake: FeatureStats, *, kid: bool = True, kid_subsets: int = 100,
              kid_subset_size: int = 1000, seed: int = 0) -> dict[str, Any]:
    """FD between two statistics of one feature space (``fid`` too in the Inception space), and KID where
    both carry their features."""
    # argument order as clean-fid's compare_folders(real, fake)
    fd = frechet_distance(real.mu, real.sigma, fake.mu, fake.sigma)
    result: dict[str, Any] = {"fd": fd, "features": real.space}
    if real.space == "inception":
        result["fid"] = fd
    if kid and real.features is not None and fake.features is not None:
        result["kid"] = kernel_distance(real.features, fake.features, kid_subsets, kid_subset_size, seed)
        result["kid_seed"] = seed
    else:
        result["kid"] = None
        if kid:
            result["kid_skipped"] = "reference statistics hold no features (saved without them)"
    return result


@dataclass
class StatsPair:
    """The statistics of both sides in one feature space, what made them, and how they were read."""

    real: FeatureStats
    fake: FeatureStats
    described: dict[str, Any]
    real_report: dict[str, Any]
    fake_report: dict[str, Any]

    def counts(self) -> dict[str, Any]:
        return {"n_real": self.real.n, "n_fake": self.fake.n,
                "skipped_real": self.real_report.get("skipped", {}).get("count", 0),
                "skipped_fake": self.fake_report.get("skipped", {}).get("count", 0),
                **self.described, "real": self.real_report, "fake": self.fake_report}


def _stats_space(source: Any) -> str | None:
    if isinstance(source, FeatureStats):
        return source.space
    return FeatureStats.read_meta(source)["features"] if _is_stats_file(source) else None


def stats_pair(real: ImageSource | FeatureStats, fake: ImageSource | FeatureStats,
               extractor: AnyExtractor | None = None, *, features: str | None = None, default_space: str = "inception",
               model: str | os.PathLike | None = None, inception: str | os.PathLike | None = None,
               batch_size: int = 32, device: str | torch.device = "cpu", max_images: int | None = None,
               allow_download: bool = False, workers: int = 0) -> StatsPair:
    """Statistics of two sources in one feature space: ``features``, else that of a statistics file among them,
    else ``default_space``; its network is ``model`` (``inception``: the Inception weights, when the space is
    Inception's and ``model`` is None). Two statistics files are compared with each other without loading any
    network."""
    spaces = {space for space in (_stats_space(real), _stats_space(fake)) if space is not None}
    if len(spaces) > 1:
        raise StatsMismatch(f"the two statistics hold different features ({' and '.join(sorted(spaces))})")
    space = features or (spaces.pop() if spaces else default_space)
    both_stats = all(isinstance(x, FeatureStats) or _is_stats_file(x) for x in (real, fake))
    if extractor is None and both_stats:
        real_stats = real if isinstance(real, FeatureStats) else FeatureStats.load(real)
        fake_stats = fake if isinstance(fake, FeatureStats) else FeatureStats.load(fake)
        if real_stats.space != space:
            raise StatsMismatch(f"{real_stats.source} holds {real_stats.space} features, not {space}")
        real_stats.check_same_features(fake_stats)
        return StatsPair(real_stats, fake_stats, real_stats.describe(), {"n": real_stats.n, "from_stats": True},
                         {"n": fake_stats.n, "from_stats": True})
    fx = resolve_extractor(extractor, inception, device, allow_download, features=space, model=model)
    real_stats, real_report = stats_of(real, fx, batch_size, device, max_images, "real", workers)
    fake_stats, fake_report = stats_of(fake, fx, batch_size, device, max_images, "fake", workers)
    return StatsPair(real_stats, fake_stats, fx.describe(), real_report, fake_report)


def compute_fd(real: ImageSource | FeatureStats, fake: ImageSource | FeatureStats, extractor: AnyExtractor | None = None,
               *, features: str | None = None, default_space: str = "inception",
               model: str | os.PathLike | None = None, inception: str | os.PathLike | None = None,
               batch_size: int = 32, device: str | torch.device = "cpu", kid: bool = False, kid_subsets: int = 100,
               kid_subset_size: int = 1000, seed: int = 0,
               max_images: int | None = None, allow_download: bool = False, workers: int = 0) -> dict[str, Any]:
    """Frechet distance (and KID on request) between two sources in one feature space.

    Each side may be an image folder (recursive), a list of image files, a list of in-memory images, a
    ``.npz`` statistics file, or :class:`FeatureStats`. ``extractor`` defaults to the network of ``features``
    (default: a statistics file's own space, else ``default_space``; ``model``, or ``inception`` for the
    Inception weights)."""
    t0 = time.perf_counter()
    pair = stats_pair(real, fake, extractor, features=features, default_space=default_space, model=model,
                      inception=inception, batch_size=batch_size, device=device, max_images=max_images,
                      allow_download=allow_download, workers=workers)
    result = distances(pair.real, pair.fake, kid=kid, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size,
                       seed=seed)
    result.update({**pair.counts(), "small_n": small_n_note(pair.real.space),
                   "seconds": round(time.perf_counter() - t0, 2)})
    return result


def compute_fid(real: ImageSource | FeatureStats, fake: ImageSource | FeatureStats, extractor: AnyExtractor | None = None,
                *, kid: bool = True, **kwargs: Any) -> dict[str, Any]:
    """FID (and KID where both sides have features) between two sources: :func:`compute_fd` in the Inception
    space. ``extractor`` defaults to the Inception network resolved by
    :func:`eval.inception.resolve_inception_weights` (``inception=PATH`` names a file)."""
    if kwargs.get("features", "inception") != "inception":
        raise InvalidInput("compute_fid is the Inception space's distance; use compute_fd for other features")
    return compute_fd(real, fake, extractor, kid=kid, **{**kwargs, "features": "inception"})


def fid_sampler_vs_stats(sample: Callable[[int], Any], num_images: int,
                         reference: str | os.PathLike | FeatureStats | ImageSource, extractor: AnyExtractor | None = None,
                         *, inception: str | os.PathLike | None = None, batch_size: int = 32,
                         device: str | torch.device = "cpu", allow_download: bool = False, **kwargs: Any) -> dict[str, Any]:
    """FID of ``num_images`` images drawn from ``sample(n)`` (a list of PIL images / uint8 arrays,
    or an (n, ...) uint8 array) against reference statistics or a real image source. Features are
    extracted batch by batch, so the images are never all held in memory."""
    fx = resolve_extractor(extractor, inception, device, allow_download)
    t0 = time.perf_counter()
    chunks, done = [], 0
    while done < num_images:
        images = split_batch(sample(min(batch_size, num_images - done)))[: num_images - done]
        if not images:
            raise ValueError("the sampling function returned no images")
        chunks.append(extract_features(images, fx, batch_size, device))
        done += len(images)
    fs = FeatureSet(np.concatenate(chunks), f"{num_images} sampled images", seconds=time.perf_counter() - t0)
    fake = FeatureStats.from_features(fs, fx)
    return compute_fid(reference, fake, fx, batch_size=batch_size, device=device, **kwargs)


def save_reference_stats(source: ImageSource, out_path: str | os.PathLike, extractor: AnyExtractor | None = None, *,
                         features: str = "inception", model: str | os.PathLike | None = None,
                         inception: str | os.PathLike | None = None, batch_size: int = 32,
                         device: str | torch.device = "cpu", max_images: int | None = None,
                         include_features: bool = True, allow_download: bool = False, workers: int = 0) -> dict[str, Any]:
    """Compute and save reference statistics of an image source in a feature space; returns their metadata."""
    fx = resolve_extractor(extractor, inception, device, allow_download, features=features, model=model)
    stats, report = stats_of(source, fx, batch_size, device, max_images, workers=workers)
    path = stats.save(out_path, include_features=include_features)
    return {"stats": str(path), **stats.meta(), **fx.describe(), "skipped": report.get("skipped", {}).get("count", 0),
            "images_per_s": report.get("images_per_s")}


def reference_stats_by_space(sources: Sequence[str | os.PathLike] | str | os.PathLike | None) -> dict[str, Path]:
    """Statistics files given for several feature spaces, by space (from each file's metadata alone); two files
    of one space are refused."""
    by_space: dict[str, Path] = {}
    for source in [] if sources is None else [sources] if isinstance(sources, (str, os.PathLike)) else sources:
        space = FeatureStats.read_meta(source)["features"]
        if space in by_space:
            raise InvalidInput(f"two reference statistics of {space} features: {by_space[space]} and {source}")
        by_space[space] = Path(source)
    return by_space
