"""Import a user's folder of captioned images into the image-folder format.

Why a separate import step: users' folders hold every kind of file (CMYK JPEGs, palette PNGs
with transparency, 16-bit grayscale, truncated downloads, 0-byte files, text named ``.jpg``,
200-megapixel scans). Decoding, validating, centre-cropping and resizing them once, up front,
gives training a clean, uniform RGB data set and a report of what was dropped and why, instead
of a crash or a silently black image in epoch 7.

Captions come from the first of these that exists in ``src``:

1. ``metadata.jsonl``: ``{"file_name": "a/b.jpg", "text": "..."}`` per line (the Hugging Face
   image-folder convention); other keys are carried over, ``split`` ("train"/"val") is honoured;
2. ``*.csv`` at the top level: a file column (file_name / filename / file / image / image_path /
   path) and a caption column (text / caption / prompt);
3. sidecar ``.txt`` files next to each image with the same stem (``cat.jpg`` + ``cat.txt``).

Images without a caption are skipped and counted as "no caption". Output::

    OUT/metadata.jsonl   file_name, text, split, source (path relative to src), extra keys
    OUT/images/000000.png
"""

from __future__ import annotations

import csv
import os
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Iterable

from ..common.errors import InputNotFound, InvalidInput
from ..common.files import iter_jsonl
from ..data.imageio import save_png
from .imageio import (
    DEFAULT_MAX_PIXELS,
    IMAGE_DIR,
    METADATA,
    MISSING,
    NO_CAPTION,
    BadImage,
    assign_split,
    center_crop_resize,
    image_path,
    load_rgb,
    write_metadata,
)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".bmp", ".gif", ".tif", ".tiff",
                              ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico"})
FILE_COLUMNS = ("file_name", "filename", "file", "image", "image_path", "path")
TEXT_COLUMNS = ("text", "caption", "prompt")
_RESERVED = {"file_name", "text", "split", "source"}
_SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val"}


def _norm(rel: str) -> str:
    """Relative path as a POSIX string without "./", so caption keys match scanned files."""
    return Path(rel.strip().replace("\\", "/")).as_posix().removeprefix("./")


def _read_jsonl_captions(path: Path) -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    for lineno, row in iter_jsonl(path, "captions file"):
        if "file_name" not in row:
            raise InvalidInput(f"{path}:{lineno}: expected an object with a 'file_name' key")
        table.setdefault(_norm(str(row["file_name"])), row)
    return table


def _read_csv_captions(paths: Iterable[Path]) -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    for path in paths:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            cols = {c.strip().lower(): c for c in (reader.fieldnames or []) if c}
            fcol = next((cols[c] for c in FILE_COLUMNS if c in cols), None)
            tcol = next((cols[c] for c in TEXT_COLUMNS if c in cols), None)
            if fcol is None or tcol is None:
                raise InvalidInput(f"{path}: needs a file column ({'/'.join(FILE_COLUMNS)}) and a caption column "
                                 f"({'/'.join(TEXT_COLUMNS)}); found {reader.fieldnames}")
            for row in reader:
                if not row.get(fcol):
                    continue
                entry = {k.strip(): v for k, v in row.items() if k and k not in (fcol, tcol)}
                entry["text"] = row.get(tcol)
                table.setdefault(_norm(row[fcol]), entry)
    return table


def find_captions(src: str | os.PathLike) -> tuple[str, dict[str, dict[str, Any]] | None]:
    """(source name, {relative path: row with "text"}) or ("sidecar", None) for .txt files."""
    src = Path(src)
    if (src / METADATA).is_file():
        return METADATA, _read_jsonl_captions(src / METADATA)
    csvs = sorted(p for p in src.glob("*.csv") if p.is_file())
    if csvs:
        return ",".join(p.name for p in csvs), _read_csv_captions(csvs)
    return "sidecar .txt", None


def _scan(src: Path, exclude: Path | None) -> list[str]:
    """Image-like files under src (sorted relative POSIX paths), skipping the output folder."""
    found = []
    for root, dirs, files in os.walk(src):
        rootp = Path(root)
        dirs[:] = sorted(d for d in dirs if exclude is None or (rootp / d).resolve() != exclude)
        for name in files:
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                found.append((rootp / name).relative_to(src).as_posix())
    return sorted(found)


def _sidecar_caption(path: Path) -> str | None:
    txt = path.with_suffix(".txt")
    try:
        return txt.read_text(encoding="utf-8", errors="replace").strip() if txt.is_file() else None
    except OSError:
        return None


def _convert_one(job: tuple[str, str, int, int | None, int]) -> str | None:
    """Decode, crop, resize and write one image; returns a skip reason or None (worker entry)."""
    src, dst, size, max_pixels, min_side = job
    try:
        img = load_rgb(src, max_pixels=max_pixels, min_side=min_side, draft=size)
    except BadImage as e:
        return e.reason
    save_png(center_crop_resize(img, size), dst)
    return None


def import_folder(src: str | os.PathLike, out: str | os.PathLike, size: int, val_fraction: float = 0.1,
                  seed: int = 0, max_pixels: int | None = DEFAULT_MAX_PIXELS, min_side: int = 1,
                  workers: int = 1) -> dict[str, Any]:
    """Import captioned images from ``src`` into the image folder ``out`` (``size`` x ``size`` RGB PNG).

    Every file is fully decoded; a file that is empty, not an image, corrupt, truncated, larger
    than ``max_pixels`` pixels, smaller than ``min_side`` on its shorter side, missing (listed
    in a caption file only) or without a caption is skipped and counted by reason, never a
    crash. ``min_side=1`` (default) imports even a 1x1 image (upscaled to a flat colour): the
    importer does not guess what is too small for you; pass e.g. ``min_side=size`` to drop
    thumbnails. Files are processed in sorted path order and the split hashes (seed, source
    path) unless the caption file says "train"/"val", so re-imports are identical.
    ``workers > 1`` decodes in that many processes (same output).

    Returns ``{"imported", "skipped": {reason: count}, "total_seen", "caption_source",
    "seconds", "images_per_s", "out"}``.
    """
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise InputNotFound(f"source directory not found: {src}")
    if out.resolve() == src.resolve():
        raise InvalidInput("out must differ from src (importing would overwrite the source images)")
    t0 = time.perf_counter()
    caption_source, table = find_captions(src)
    exclude = out.resolve() if out.resolve().is_relative_to(src.resolve()) else None
    candidates = set(_scan(src, exclude))
    if table is not None:
        candidates |= set(table)
    skipped: Counter[str] = Counter()
    jobs: list[tuple[str, str, int, int | None, int]] = []
    rows: list[dict[str, Any]] = []
    (out / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    for rel in sorted(candidates):
        path = src / rel
        if table is not None:
            entry = table.get(rel)
            text = entry.get("text") if entry else None
        else:
            entry, text = None, _sidecar_caption(path)
        text = text.strip() if isinstance(text, str) else None
        if not text:
            skipped[NO_CAPTION] += 1
            continue
        if not path.is_file():
            skipped[MISSING] += 1
            continue
        extra = {k: v for k, v in (entry or {}).items() if k not in _RESERVED}
        split = _SPLIT_ALIASES.get(str((entry or {}).get("split", "")).strip().lower())
        split = split or assign_split(rel, val_fraction, f"folder:{seed}")
        rows.append({"text": text, "split": split, "source": rel, **extra})
        jobs.append((str(path), "", size, max_pixels, min_side))

    # decode everything; output names are assigned in order among the successes afterwards, so
    # write to a temporary name first and rename (keeps names dense: 000000, 000001, ...)
    jobs = [(j[0], str(out / IMAGE_DIR / f".import-{i:08d}.png"), *j[2:]) for i, j in enumerate(jobs)]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(_convert_one, jobs, chunksize=max(1, min(64, len(jobs) // (4 * workers)))))
    else:
        results = [_convert_one(j) for j in jobs]
    kept: list[dict[str, Any]] = []
    for row, job, reason in zip(rows, jobs, results):
        if reason is not None:
            skipped[reason] += 1
            continue
        name = image_path(len(kept))
        os.replace(job[1], out / name)
        kept.append({"file_name": name, **row})
    if not kept:  # an image folder with nothing in it would only fail later, further from the cause
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(skipped.items())) or "no image files at all"
        raise InvalidInput(f"{src}: no image imported from {len(candidates)} candidates ({reasons}); captions come "
                           "from metadata.jsonl/captions.csv or a .txt beside each image")
    write_metadata(out, kept)
    seconds = time.perf_counter() - t0
    return {"out": str(out), "imported": len(kept), "skipped": dict(sorted(skipped.items())),
            "total_seen": len(candidates), "caption_source": caption_source, "seconds": round(seconds, 3),
            "images_per_s": round(len(kept) / seconds, 1) if seconds > 0 else 0.0}
