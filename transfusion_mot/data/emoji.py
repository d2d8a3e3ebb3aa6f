"""Captioned emoji rendered from the Noto Color Emoji font: ~1,400 real, colourful icons.

Why: a small *natural-ish* data set (faces, food, animals, objects) with free, exact captions
(the Unicode character names), which needs no download beyond a Debian font package.

Layout written by :func:`generate_emoji` (the image-folder contract)::

    OUT/metadata.jsonl   file_name, text, split, codepoint ("U+1F34E"), char
    OUT/images/000000.png
"""

from __future__ import annotations

import os
import time
import unicodedata
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..common.errors import InputNotFound, InvalidInput
from ..data.imageio import save_png
from .imageio import IMAGE_DIR, WHITE, assign_split, center_crop_resize, image_path, write_metadata

DEFAULT_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
FONT_SIZE = 109  # the CBDT bitmap strike of Noto Color Emoji only loads at this size
# emoji blocks: misc symbols & dingbats, then misc symbols & pictographs ... symbols & pictographs ext-A
EMOJI_RANGES: tuple[tuple[int, int], ...] = ((0x2600, 0x27BF), (0x1F300, 0x1FAFF))
# code points that render as colour swatches or combining pieces rather than pictures
_SKIP = set(range(0x1F3FB, 0x1F400)) | set(range(0x1F1E6, 0x1F200))
_NOTDEF_PROBE = 0x10FFFD  # a private-use / unassigned code point: renders as the font's tofu (or nothing)
_CANVAS = 160


def _missing_font(path: str) -> InputNotFound:
    return InputNotFound(
        f"emoji font not found at {path}: install it with `sudo apt-get install fonts-noto-color-emoji` "
        f"or pass --font PATH to a Noto Color Emoji .ttf")


def load_font(path: str | os.PathLike | None = None) -> ImageFont.FreeTypeFont:
    """Open the colour emoji font at its bitmap size; FileNotFoundError says how to install it."""
    path = str(path or DEFAULT_FONT)
    if not Path(path).is_file():
        raise _missing_font(path)
    try:
        return ImageFont.truetype(path, size=FONT_SIZE)
    except OSError as e:
        raise InvalidInput(f"cannot load {path} at size {FONT_SIZE} (a CBDT colour bitmap font such as "
                      f"NotoColorEmoji.ttf is expected): {e}") from e


def render_raw(ch: str, font: ImageFont.FreeTypeFont) -> Image.Image:
    """The glyph on a transparent RGBA canvas, with its colour bitmap (not a black outline)."""
    canvas = Image.new("RGBA", (_CANVAS, _CANVAS), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((8, 8), ch, font=font, embedded_color=True)
    return canvas


def render_emoji(ch: str, size: int, font: ImageFont.FreeTypeFont) -> Image.Image | None:
    """One emoji as an RGB ``size`` x ``size`` image on white, centred; None if nothing renders.

    The glyph is cropped to its alpha bounding box, padded to a centred square (emoji keep
    their aspect ratio), composited onto white and downscaled with LANCZOS from ~128 px.
    """
    raw = render_raw(ch, font)
    return finish(raw, size)


def finish(raw: Image.Image, size: int) -> Image.Image | None:
    """Crop an RGBA render to content, centre on a white square and resize (None if blank)."""
    bbox = raw.getchannel("A").getbbox()
    if bbox is None:
        return None
    glyph = raw.crop(bbox)
    w, h = glyph.size
    side = max(w, h)
    square = Image.new("RGBA", (side, side), (*WHITE, 255))
    square.alpha_composite(glyph, ((side - w) // 2, (side - h) // 2))
    return center_crop_resize(square.convert("RGB"), size)


def candidate_codepoints(ranges: Iterable[tuple[int, int]] = EMOJI_RANGES) -> Iterator[int]:
    """Assigned single code points in the emoji blocks, in code point order."""
    for lo, hi in ranges:
        for cp in range(lo, hi + 1):
            if cp not in _SKIP and unicodedata.name(chr(cp), None) is not None:
                yield cp


def generate_emoji(out: str | os.PathLike, size: int = 32, font: str | os.PathLike | None = None,
                   val_fraction: float = 0.1, seed: int = 0, limit: int | None = None,
                   codepoints: Iterable[int] | None = None) -> dict[str, Any]:
    """Render every single-code-point emoji the font has into the image folder ``out``.

    Caption = ``unicodedata.name(ch).lower()`` ("U+1F34E" -> "red apple"). Code points whose
    render is blank, pure white or identical to the font's not-defined glyph are skipped.
    ``codepoints`` restricts the candidates (default: the emoji blocks); ``limit`` stops after
    that many images (tests). The split hashes (seed, caption), so it is stable when the font
    gains or loses glyphs. Raises FileNotFoundError (mentioning apt-get and --font) when the
    font is missing.

    Returns ``{"count", "train", "val", "skipped", "seconds", "images_per_s", "out"}``.
    """
    fnt = load_font(font)
    out = Path(out)
    (out / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tofu = np.asarray(render_raw(chr(_NOTDEF_PROBE), fnt))
    cps = candidate_codepoints() if codepoints is None else codepoints
    rows: list[dict[str, Any]] = []
    skipped = 0
    for cp in cps:
        if limit is not None and len(rows) >= limit:
            break
        ch = chr(cp)
        name = unicodedata.name(ch, None)
        if name is None or cp in _SKIP:
            skipped += 1
            continue
        raw = render_raw(ch, fnt)
        if np.array_equal(np.asarray(raw), tofu):
            skipped += 1
            continue
        img = finish(raw, size)
        if img is None or img.getextrema() == ((255, 255),) * 3:
            skipped += 1
            continue
        file_name = image_path(len(rows))
        save_png(img, out / file_name)
        text = name.lower()
        rows.append({"file_name": file_name, "text": text, "split": assign_split(text, val_fraction, f"emoji:{seed}"),
                     "codepoint": f"U+{cp:04X}", "char": ch})
    write_metadata(out, rows)
    seconds = time.perf_counter() - t0
    n_val = sum(r["split"] == "val" for r in rows)
    return {"out": str(out), "count": len(rows), "train": len(rows) - n_val, "val": n_val, "skipped": skipped,
            "seconds": round(seconds, 3), "images_per_s": round(len(rows) / seconds, 1) if seconds > 0 else 0.0}
