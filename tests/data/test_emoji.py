"""Emoji data set: real colour renders with the right Unicode-name captions."""

import unicodedata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transfusion_mot.data.emoji import DEFAULT_FONT, candidate_codepoints, generate_emoji
from transfusion_mot.data.imageio import read_metadata

needs_font = pytest.mark.skipif(not Path(DEFAULT_FONT).is_file(), reason="fonts-noto-color-emoji not installed")

APPLE, GREEN_APPLE, BANANA, BLUE_HEART = 0x1F34E, 0x1F34F, 0x1F34C, 0x1F499
UNASSIGNED = 0x1FAFF  # no character (and no glyph) at this code point


@pytest.fixture(scope="module")
def fruit(tmp_path_factory):
    out = tmp_path_factory.mktemp("emoji")
    summary = generate_emoji(out, size=32, codepoints=[APPLE, GREEN_APPLE, BANANA, BLUE_HEART, UNASSIGNED,
                                                       0x1F3FB])
    return out, summary, {r["codepoint"]: r for r in read_metadata(out)}


def _img(out, row):
    return np.asarray(Image.open(out / row["file_name"])).astype(int)


@needs_font
def test_captions_and_skips(fruit):
    _, summary, rows = fruit
    assert set(rows) == {"U+1F34E", "U+1F34F", "U+1F34C", "U+1F499"}
    assert summary["count"] == 4 and summary["skipped"] == 2
    assert rows["U+1F34E"]["text"] == "red apple"
    assert rows["U+1F34C"]["text"] == "banana"
    assert rows["U+1F499"]["text"] == "blue heart"
    assert rows["U+1F34E"]["char"] == "\N{RED APPLE}"
    assert all(r["split"] in ("train", "val") for r in rows.values())


@needs_font
def test_renders_are_coloured_and_match_names(fruit):
    out, _, rows = fruit
    for row in rows.values():
        img = Image.open(out / row["file_name"])
        assert img.mode == "RGB" and img.size == (32, 32)
        a = _img(out, row)
        assert a.std() > 20 and (a < 200).any(axis=-1).mean() > 0.2  # not blank, not all white
        assert (a[0, 0] > 240).all() or (a[16, 0] > 240).all()  # white background at the edge
    centre = lambda row: _img(out, row)[10:22, 10:22].reshape(-1, 3).mean(0)  # noqa: E731
    r, g, b = centre(rows["U+1F34E"])
    assert r > g + 60 and r > b + 60, (r, g, b)  # red apple is red
    r, g, b = centre(rows["U+1F34F"])
    assert g > r and g > b + 40, (r, g, b)  # green apple is green
    r, g, b = centre(rows["U+1F499"])
    assert b > r + 60, (r, g, b)  # blue heart is blue
    r, g, b = centre(rows["U+1F34C"])
    assert r > b + 60 and g > b + 60, (r, g, b)  # banana is yellow


@needs_font
def test_deterministic_and_limit(tmp_path, fruit):
    out, _, rows = fruit
    s = generate_emoji(tmp_path, size=32, codepoints=[APPLE, GREEN_APPLE, BANANA, BLUE_HEART], limit=2)
    assert s["count"] == 2
    again = read_metadata(tmp_path)
    assert [r["codepoint"] for r in again] == ["U+1F34E", "U+1F34F"]
    for r in again:
        assert (tmp_path / r["file_name"]).read_bytes() == (out / rows[r["codepoint"]]["file_name"]).read_bytes()
        assert r["split"] == rows[r["codepoint"]]["split"]


def test_candidates_are_named_single_codepoints():
    cps = list(candidate_codepoints())
    assert APPLE in cps and UNASSIGNED not in cps and 0x1F3FB not in cps
    assert len(cps) > 1200
    assert all(unicodedata.name(chr(c), None) for c in cps)


def test_missing_font_message(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        generate_emoji(tmp_path / "out", font=tmp_path / "nope.ttf")
    msg = str(e.value)
    assert "apt-get install fonts-noto-color-emoji" in msg and "--font PATH" in msg and "\n" not in msg


@needs_font
@pytest.mark.slow
def test_full_set(tmp_path):
    s = generate_emoji(tmp_path, size=32)
    rows = read_metadata(tmp_path)
    assert s["count"] == len(rows) > 1200
    assert len({r["text"] for r in rows}) == len(rows)
    assert 0.05 < s["val"] / s["count"] < 0.15
