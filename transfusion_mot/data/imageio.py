"""Image files and folders of them, for every data set writer and reader.

All data sets in transfusion-mot use one on-disk contract (the *image folder*)::

    DIR/metadata.jsonl      one JSON object per line: file_name, text, split, extra attributes
    DIR/images/000000.png   RGB PNG, square, size x size

Generated samples go to a *sample folder* (`save_images`): the PNGs and DIR/manifest.json, which says what
made each image (prompt, seed, checkpoint, sampler); PNGs are written byte-reproducibly (`save_png`).

Everything that touches user files goes through :func:`load_rgb`, which turns every way an
image can be broken into a :class:`BadImage` with a short, countable ``reason`` instead of a
crash, so an import of 100k scraped files reports "37 corrupt, 2 too large" and carries on.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..common.errors import InputNotFound, InvalidInput
from ..common.files import iter_jsonl, write_json
from ..common.images import to_pil

METADATA = "metadata.jsonl"
IMAGE_DIR = "images"
SPLITS = ("train", "val")

# reasons reported by BadImage (and counted by importers); keep them short and human readable
EMPTY = "empty file"
NOT_IMAGE = "not an image"
CORRUPT = "corrupt"
TRUNCATED = "truncated"
TOO_LARGE = "too large"
TOO_SMALL = "too small"
UNREADABLE = "unreadable"
MISSING = "missing file"
NO_CAPTION = "no caption"

DEFAULT_MAX_PIXELS = 40_000_000
WHITE = (255, 255, 255)


class BadImage(Exception):
    """An input file that cannot be used as a training image; ``reason`` is a short count key."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def load_rgb(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS, min_side: int = 1,
             background: tuple[int, int, int] = WHITE, draft: int | None = None) -> Image.Image:
    """Decode ``path`` fully and return an 8-bit RGB image, or raise :class:`BadImage`.

    Why so careful: ``Image.open`` is lazy, so a truncated file only fails on ``load()``; a
    decompression bomb must be refused from the header before any pixels are allocated; and
    alpha / palette / 16-bit / CMYK inputs silently turn into black backgrounds or clipped
    white images if converted naively.

    ``max_pixels``: refuse images with more pixels (header check, before decoding; None = no
    limit of ours, Pillow's own hard bomb limit still applies). ``min_side``: refuse images whose
    shorter side is smaller. ``background``: colour that transparent pixels are composited onto.
    ``draft``: if set, let JPEG decoders downscale by 1/2..1/8 while keeping the shorter side
    >= draft (much faster for photos that get resized to a small size anyway).
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise BadImage(EMPTY, str(path))
    except FileNotFoundError as e:
        raise BadImage(MISSING, str(path)) from e
    except OSError as e:
        raise BadImage(UNREADABLE, f"{path}: {e}") from e
    try:
        with warnings.catch_warnings():
            # our own max_pixels check below is the authority; Pillow's hard limit (2x its
            # MAX_IMAGE_PIXELS) still raises DecompressionBombError, which we count as too large
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if max_pixels is not None and w * h > max_pixels:
                    raise BadImage(TOO_LARGE, f"{path}: {w}x{h} > {max_pixels} pixels")
                if min(w, h) < max(min_side, 1):
                    raise BadImage(TOO_SMALL, f"{path}: {w}x{h}, min side {min_side}")
                if draft is not None and im.format == "JPEG":
                    # keep enough resolution for a centre crop of side `draft`
                    scale = max(1, min(w, h) // max(draft, 1))
                    im.draft("RGB", (max(1, w // scale), max(1, h // scale)))
                im.load()
                if im.getexif().get(0x0112, 1) != 1:  # phone photos store rotation in EXIF
                    im = ImageOps.exif_transpose(im)
                return to_rgb(im, background)
    except BadImage:
        raise
    except UnidentifiedImageError as e:
        raise BadImage(NOT_IMAGE, str(path)) from e
    except Image.DecompressionBombError as e:
        raise BadImage(TOO_LARGE, f"{path}: {e}") from e
    except MemoryError as e:
        raise BadImage(TOO_LARGE, f"{path}: out of memory") from e
    except PermissionError as e:
        raise BadImage(UNREADABLE, f"{path}: {e}") from e
    except Exception as e:  # decoders raise OSError, SyntaxError, ValueError, struct.error, EOFError ...
        reason = TRUNCATED if "truncat" in str(e).lower() else CORRUPT
        raise BadImage(reason, f"{path}: {type(e).__name__}: {e}") from e


def to_rgb(im: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited onto ``background``.

    Why not ``im.convert("RGB")``: that drops alpha (transparent pixels keep whatever colour
    they stored, often black), and clips 16/32-bit grayscale to 255 (an almost white image).
    """
    mode = im.mode
    if mode == "RGB":
        return im
    if mode == "P" or mode == "PA":
        im = im.convert("RGBA")  # applies tRNS / palette alpha
        mode = "RGBA"
    elif mode in ("LA", "La", "RGBa"):
        im = im.convert("RGBA")
        mode = "RGBA"
    elif mode in ("L", "1"):
        return im.convert("L").convert("RGB")
    elif mode.startswith("I") or mode == "F":
        return Image.fromarray(_scale_to_uint8(np.asarray(im)), "L").convert("RGB")
    if mode == "RGBA":
        if im.getextrema()[3][0] == 255:  # fully opaque: skip the composite
            return im.convert("RGB")
        base = Image.new("RGBA", im.size, (*background, 255))
        return Image.alpha_composite(base, im).convert("RGB")
    return im.convert("RGB")  # CMYK, YCbCr, LAB, HSV, I;16B ...


def _scale_to_uint8(a: np.ndarray) -> np.ndarray:
    """Map high-bit-depth grayscale onto 0..255 by its nominal range (16-bit, float 0..1)."""
    a = a.astype(np.float64)
    if a.size == 0:
        return a.astype(np.uint8)
    hi = float(a.max())
    if hi <= 1.0 and a.dtype.kind == "f":
        a = a * 255.0
    elif hi > 255.0:
        a = a * (255.0 / (65535.0 if hi <= 65535.0 else hi))
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def center_crop_resize(img: Image.Image, size: int, resample: int = Image.Resampling.LANCZOS) -> Image.Image:
    """Centre-crop to the largest square and resize to ``size`` x ``size``.

    Cropping (not padding or squashing) keeps object proportions, which text-image models
    learn. The crop happens first (not via ``resize(box=...)``, whose filter would pull in
    pixels from outside the square), and large reductions use a fast box pre-reduction.
    """
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    if (w, h) != (s, s):
        img = img.crop((left, top, left + s, top + s))
    if s == size:
        return img.copy()
    return img.resize((size, size), resample, reducing_gap=3.0 if s >= 3 * size else None)


def assign_split(key: str, val_fraction: float, salt: str | int = "") -> str:
    """Stable "train"/"val" assignment from a hash of ``key``.

    Why hash based: the split of an item does not change when items are added or removed or
    the order changes, and it does not depend on PYTHONHASHSEED.
    """
    if val_fraction <= 0:
        return "train"
    if val_fraction >= 1:
        return "val"
    h = hashlib.sha256(f"{salt}\x00{key}".encode("utf-8")).digest()
    u = int.from_bytes(h[:8], "big") / 2.0 ** 64
    return "val" if u < val_fraction else "train"


def write_metadata(out: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> Path:
    """Write ``out/metadata.jsonl`` atomically (temp file + rename).

    A crash half way leaves either the old complete file or none, never a truncated one that a
    trainer would silently read as a smaller data set.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    final = out / METADATA
    tmp = out / f".{METADATA}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                for key in ("file_name", "text", "split"):
                    if key not in row:
                        raise ValueError(f"metadata row lacks {key!r}: {row}")
                f.write(json.dumps(row, ensure_ascii=False, separators=(", ", ": ")) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()
    return final


def read_metadata(directory: str | os.PathLike, split: str | None = None) -> list[dict[str, Any]]:
    """Read ``directory/metadata.jsonl`` (blank lines ignored), optionally one split only (a row
    without ``split`` counts as "train"; ``caption`` is accepted for ``text``).

    A missing file or a bad line is an error naming the file and line number, because a bad line in
    a hand-edited file is otherwise very hard to find.
    """
    path = Path(directory) / METADATA
    if not path.is_file():
        raise InputNotFound(f"{path} not found: not an image-folder data set (expected {METADATA})")
    rows: list[dict[str, Any]] = []
    for lineno, row in iter_jsonl(path):
        if not isinstance(row.get("file_name"), str):
            raise InvalidInput(f"{path}:{lineno}: each line needs a string 'file_name'")
        if not isinstance(row.get("text", row.get("caption")), str):
            raise InvalidInput(f"{path}:{lineno}: each line needs a string 'text' (the caption)")
        row.setdefault("text", row.get("caption"))
        if split is None or row.get("split", "train") == split:  # a row without split is training data
            rows.append(row)
    return rows


def folder_captions(directory: str | os.PathLike, split: str = "train") -> Iterator[str]:
    """The non-empty captions of an image folder's rows of `split` (rows with no split count as train)."""
    for row in read_metadata(directory, split=split):
        if row["text"]:
            yield row["text"]


def save_png(img: Image.Image, path: str | os.PathLike, compress_level: int = 6) -> None:
    """Write an RGB PNG without timestamps or other metadata, so equal pixels give equal bytes.

    Encoding to memory and writing once is ~25% faster for tiny images than ``img.save(path)``."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=compress_level)
    with open(path, "wb") as f:
        f.write(buf.getbuffer())


def save_images(images: Sequence[Any], out_dir: str | os.PathLike, rows: Sequence[dict[str, Any]], *,
                name: str = "{index:05d}.png", key: str = "file", start: int = 0,
                manifest: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Write images[k] as PNG `out_dir/name.format(index=start + k)` and return `rows` with that relative file
    name under `key`; with `manifest`, also write out_dir/manifest.json = {**manifest, "images": rows}."""
    if len(images) != len(rows):
        raise ValueError(f"{len(images)} images but {len(rows)} rows")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for k, (image, row) in enumerate(zip(images, rows)):
        file_name = name.format(index=start + k)
        (out / file_name).parent.mkdir(parents=True, exist_ok=True)
        save_png(to_pil(image), out / file_name)
        written.append({key: file_name, **row})
    if manifest is not None:
        write_json(out / "manifest.json", {**manifest, "images": written})
    return written


def image_path(index: int) -> str:
    """Relative file name of the ``index``-th image, shared by all writers."""
    return f"{IMAGE_DIR}/{index:06d}.png"
