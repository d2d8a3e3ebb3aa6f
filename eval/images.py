"""Image inputs shared by every metric: folders, captioned folders, lazily decoded image lists.

Why one module: every metric must read a folder the same way (recursive, sorted, the same
extensions) and must count, not crash on, the one corrupt file in 30k generated images.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from transfusion_mot.common.errors import InputNotFound, InvalidInput
from transfusion_mot.data.imageio import BadImage, load_rgb, read_metadata

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class ImageFolderNotFound(InputNotFound):
    """A folder of images that does not exist or holds no images."""


def list_images(folder: str | os.PathLike) -> list[Path]:
    """All image files under ``folder`` (recursive, sorted, extensions case-insensitive); for a sample
    folder (`tmot sample`: a manifest.json listing its images), exactly the images it lists, so its
    grid.png is not scored as one more sample."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageFolderNotFound(f"image folder not found: {folder}")
    listed = sample_manifest_images(folder)
    if listed is not None:
        return listed
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise ImageFolderNotFound(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {folder}")
    return files


def sample_manifest_images(folder: Path) -> list[Path] | None:
    """The images a sample folder's manifest.json lists (`{"images": [{"file": ...}, ...]}`), or None when
    the folder has no such manifest; a listed file that is missing is an error naming it."""
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        rows = json.loads(manifest.read_text())["images"]
        files = [folder / row["file"] for row in rows]
    except (ValueError, KeyError, TypeError):
        return None  # some other manifest.json: not ours, so the folder is read as a plain image folder
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise InvalidInput(f"{manifest} lists {len(missing)} images that are missing (first: {missing[0].name}); "
                           "sample the folder again or remove manifest.json to score whatever images it holds")
    if not files:
        raise ImageFolderNotFound(f"{manifest} lists no images")
    return files


def split_batch(batch: Any) -> list[Any]:
    """A generator's output as a list of single images: a list stays a list, an (N, ...) array or
    tensor is split along its first axis."""
    if isinstance(batch, (list, tuple)):
        return list(batch)
    if hasattr(batch, "ndim") and batch.ndim == 4:
        return [batch[i] for i in range(batch.shape[0])]
    raise ValueError(f"expected a list of images or an (N, H, W, 3) / (N, 3, H, W) array, got {type(batch).__name__}")


class SkipCounter:
    """Counts unreadable images by reason ("corrupt", "truncated", ...) and remembers a few."""

    def __init__(self) -> None:
        self.reasons: Counter[str] = Counter()
        self.examples: list[str] = []

    def add(self, error: BadImage) -> None:
        self.reasons[error.reason] += 1
        if len(self.examples) < 5:
            self.examples.append(str(error))

    @property
    def total(self) -> int:
        return sum(self.reasons.values())

    def as_dict(self) -> dict[str, Any]:
        return {"count": self.total, "reasons": dict(self.reasons), "examples": self.examples}


def iter_loaded(paths: Sequence[Path], skipped: SkipCounter) -> Iterator[tuple[Path, np.ndarray]]:
    """(path, uint8 HWC array) for every readable image; broken ones are counted in ``skipped``."""
    for path in paths:
        try:
            yield path, np.asarray(load_rgb(path, max_pixels=None))
        except BadImage as err:
            skipped.add(err)


class LazyImages(Sequence):
    """Image files decoded on access (a batch at a time), so 30k images never sit in memory.

    With ``skipped`` given, unreadable files are left out of every slice and counted there (use
    it where order does not pair images with anything, e.g. a real set for CMMD); without it, an
    unreadable file is a ValueError.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], skipped: SkipCounter | None = None) -> None:
        self.paths = [Path(p) for p in paths]
        self.skipped = skipped

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            if self.skipped is not None:
                return [array for _, array in iter_loaded(self.paths[index], self.skipped)]
            return [self._load(p) for p in self.paths[index]]
        return self._load(self.paths[index])

    @staticmethod
    def _load(path: Path) -> np.ndarray:
        try:
            return np.asarray(load_rgb(path, max_pixels=None))
        except BadImage as err:
            raise InvalidInput(f"unreadable image {path}: {err}") from None


def captioned_images(folder: str | os.PathLike, split: str | None = None) -> tuple[list[Path], list[str]]:
    """Image paths and captions of an image folder with metadata.jsonl (file_name, text)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageFolderNotFound(f"image folder not found: {folder}")
    rows = read_metadata(folder, split=split)
    if not rows:
        raise InvalidInput(f"{folder}/metadata.jsonl lists no images" + (f" of split {split!r}" if split else ""))
    return [folder / r["file_name"] for r in rows], [r["text"] for r in rows]
