"""Shapes data set: determinism, pixels agree with the stated attributes, caption round trip."""

import hashlib
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transfusion_mot.data.imageio import read_metadata
from transfusion_mot.data.shapes import (
    BACKGROUND,
    COLOURS,
    RELATIONS,
    SHAPES,
    SIZES,
    generate_shapes,
    make_caption,
    parse_caption,
    render_shapes,
    sample_scene,
)


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def shapes300(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes300")
    summary = generate_shapes(out, 300, size=32, seed=0)
    return out, summary, read_metadata(out)


def test_deterministic_per_seed(tmp_path, shapes300):
    out0, _, _ = shapes300
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate_shapes(a, 300, size=32, seed=0)
    generate_shapes(b, 40, size=32, seed=1)
    generate_shapes(c, 40, size=32, seed=1)
    assert _digest(a) == _digest(out0)
    assert _digest(b) == _digest(c)
    assert read_metadata(b) == read_metadata(c)
    # a different seed gives different images and captions
    assert _digest(b) != _digest(tmp_path / "a")
    first0 = [r["text"] for r in read_metadata(a)[:40]]
    first1 = [r["text"] for r in read_metadata(b)]
    assert first0 != first1
    assert (a / "images/000000.png").read_bytes() != (b / "images/000000.png").read_bytes()


def test_workers_give_identical_output(tmp_path):
    s1 = generate_shapes(tmp_path / "one", 600, size=32, seed=5)
    s2 = generate_shapes(tmp_path / "two", 600, size=32, seed=5, workers=2)
    assert s1["count"] == s2["count"] == 600
    assert _digest(tmp_path / "one") == _digest(tmp_path / "two")


def test_summary_split_and_format(shapes300):
    out, summary, rows = shapes300
    assert summary["count"] == 300 and summary["train"] == 270 and summary["val"] == 30
    assert [r["split"] for r in rows] == ["train"] * 270 + ["val"] * 30
    for r in rows[:20]:
        img = Image.open(out / r["file_name"])
        assert img.mode == "RGB" and img.size == (32, 32) and img.format == "PNG"
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*tmp"))


def test_pixels_match_attributes(shapes300):
    out, _, rows = shapes300
    for r in rows:
        a = np.asarray(Image.open(out / r["file_name"])).astype(int)
        objs = r["objects"]
        assert 1 <= len(objs) <= 2
        for o in objs:
            x, y = o["center"]
            px = a[int(y), int(x)]
            # the centre pixel shows the stated colour, and it is the closest palette colour
            assert np.abs(px - COLOURS[o["colour"]]).max() <= 12, (r["text"], px)
            nearest = min(COLOURS, key=lambda c: np.abs(np.array(COLOURS[c]) - px).sum())
            assert nearest == o["colour"]
            x0, y0, x1, y1 = o["bbox"]
            assert 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32
            assert abs((x1 - x0) - 2 * SIZES[o["size"]] * 32) < 0.05
        # corners far from objects are background
        bg = np.array(BACKGROUND)
        assert sum(np.abs(a[yy, xx] - bg).max() <= 2 for yy, xx in [(0, 0), (0, 31), (31, 0), (31, 31)]) >= 3
        if len(objs) == 2:
            (s, t), rel = objs, r["relation"]
            (sx, sy), (tx, ty) = s["center"], t["center"]
            if rel == "above":
                assert sy < ty and s["bbox"][3] <= t["bbox"][1]
            elif rel == "below":
                assert sy > ty and s["bbox"][1] >= t["bbox"][3]
            elif rel == "left of":
                assert sx < tx and s["bbox"][2] <= t["bbox"][0]
            else:
                assert rel == "right of" and sx > tx and s["bbox"][0] >= t["bbox"][2]
            # no overlap: the boxes are disjoint
            assert (s["bbox"][2] <= t["bbox"][0] or t["bbox"][2] <= s["bbox"][0]
                    or s["bbox"][3] <= t["bbox"][1] or t["bbox"][3] <= s["bbox"][1])
        else:
            assert r["relation"] is None


def test_single_object_positions(shapes300):
    _, _, rows = shapes300
    seen = Counter()
    for r in rows:
        if r["position"] is None:
            continue
        seen[r["position"]] += 1
        x, y = r["objects"][0]["center"]
        assert {"left": x < 12, "right": x > 20, "top": y < 12, "bottom": y > 20,
                "center": abs(x - 16) < 3 and abs(y - 16) < 3}[r["position"]], r
    assert set(seen) == {"left", "right", "top", "bottom", "center"}


def test_caption_round_trip_and_coverage(shapes300):
    _, _, rows = shapes300
    n_two = 0
    for r in rows:
        p = parse_caption(r["text"])
        assert p["relation"] == r["relation"] and p["position"] == r["position"]
        assert p["objects"] == [{k: o[k] for k in ("size", "colour", "shape")} for o in r["objects"]]
        assert make_caption(r["objects"], r["relation"], r["position"]) == r["text"]
        n_two += len(r["objects"]) == 2
    assert 0.35 < n_two / len(rows) < 0.65
    objs = [o for r in rows for o in r["objects"]]
    assert {o["colour"] for o in objs} == set(COLOURS)
    assert {o["shape"] for o in objs} == set(SHAPES)
    assert {o["size"] for o in objs} == set(SIZES)
    assert {r["relation"] for r in rows} - {None} == set(RELATIONS)


def test_parse_caption_forgiving_and_strict():
    assert parse_caption("  A Small RED circle  to the left of a large blue square. ") == {
        "objects": [{"size": "small", "colour": "red", "shape": "circle"},
                    {"size": "large", "colour": "blue", "shape": "square"}],
        "relation": "left of", "position": None}
    assert parse_caption("a large green triangle on the left")["position"] == "left"
    for bad in ["a red circle", "a small pink circle", "a small red circle near a blue square", "hello", ""]:
        with pytest.raises(ValueError):
            parse_caption(bad)


def test_render_shapes_is_pure_and_reproduces_files(shapes300):
    out, _, rows = shapes300
    for r in rows[:30]:
        again = render_shapes(r["objects"], 32)
        assert np.array_equal(np.asarray(again), np.asarray(Image.open(out / r["file_name"])))
    # center+size form and RGB colours are accepted too; larger renders keep colours exact inside
    img = render_shapes([{"shape": "square", "colour": (1, 2, 3), "center": [32, 32], "size": "large"}], 64)
    assert img.size == (64, 64) and img.getpixel((32, 32)) == (1, 2, 3) and img.getpixel((1, 1)) == BACKGROUND
    with pytest.raises(ValueError):
        render_shapes([{"shape": "hexagon", "colour": "red", "center": [5, 5], "size": "small"}], 32)


@pytest.mark.parametrize("size", [16, 64, 128])
def test_other_sizes_place_objects_inside(size):
    for i in range(200):
        scene = sample_scene(random.Random(i), size)
        for o in scene["objects"]:
            x0, y0, x1, y1 = o["bbox"]
            assert 0 <= x0 and 0 <= y0 and x1 <= size and y1 <= size
