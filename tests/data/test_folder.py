"""Folder import: every kind of broken or unusual file is handled and counted, never a crash."""

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transfusion_mot.data.folder import import_folder
from transfusion_mot.data.imageio import (
    assign_split,
    read_metadata,
)

SIZE = 16
MAX_PIXELS = 50_000  # "huge.png" (300 x 300 = 90,000 px) exceeds it

# name -> expected outcome (None = imported)
EXPECTED = {
    "good.jpg": None,
    "good2.png": None,
    "sub/nested.png": None,
    "rgba.png": None,
    "palette.png": None,
    "gray.png": None,
    "gray16.png": None,
    "cmyk.jpg": None,
    "tiny.png": None,
    "random_bytes.png": "not an image",
    "notes.jpg": "not an image",
    "broken_stream.png": "corrupt",
    "truncated.jpg": "truncated",
    "empty.png": "empty file",
    "huge.png": "too large",
    "nocaption.png": "no caption",
}


def _noise(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png_bytes(img):
    b = io.BytesIO()
    img.save(b, "PNG")
    return b.getvalue()


def make_src(root: Path, captions: str) -> Path:
    """A source folder with one file per case in EXPECTED, captioned the given way."""
    src = root / "src"
    (src / "sub").mkdir(parents=True)
    Image.fromarray(_noise(48, 64)).save(src / "good.jpg", quality=90)
    Image.fromarray(_noise(60, 40, 1)).save(src / "good2.png")
    Image.new("RGB", (20, 20), (0, 128, 0)).save(src / "sub/nested.png")
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0] = 255  # red, but the left half fully transparent
    rgba[:, 16:, 3] = 255
    Image.fromarray(rgba, "RGBA").save(src / "rgba.png")
    pal = Image.new("P", (24, 24), 0)
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 black (transparent), 1 blue
    pal.paste(1, (0, 0, 24, 12))  # top half blue
    pal.save(src / "palette.png", transparency=0)
    Image.new("L", (30, 30), 100).save(src / "gray.png")
    Image.fromarray(np.full((30, 30), 65535, np.uint16)).save(src / "gray16.png")  # 16-bit white
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(src / "cmyk.jpg", quality=95)  # red in CMYK
    Image.new("RGB", (1, 1), (10, 200, 30)).save(src / "tiny.png")
    (src / "random_bytes.png").write_bytes(np.random.default_rng(3).integers(0, 256, 4000, np.uint8).tobytes())
    (src / "notes.jpg").write_text("these are my notes, not a picture\n")
    broken = bytearray(_png_bytes(Image.fromarray(_noise(64, 64, 2))))
    broken[len(broken) // 2:len(broken) // 2 + 64] = bytes(64)
    (src / "broken_stream.png").write_bytes(bytes(broken))
    b = io.BytesIO()
    Image.fromarray(_noise(64, 64, 4)).save(b, "JPEG")
    (src / "truncated.jpg").write_bytes(b.getvalue()[: len(b.getvalue()) // 2])
    (src / "empty.png").write_bytes(b"")
    Image.new("RGB", (300, 300), "white").save(src / "huge.png")
    Image.new("RGB", (8, 8), "white").save(src / "nocaption.png")
    (src / "readme.md").write_text("not an image extension: ignored entirely\n")

    captioned = [n for n in EXPECTED if n != "nocaption.png"]
    if captions == "jsonl":
        lines = [{"file_name": n, "text": f"caption of {n}", "photographer": "me"} for n in captioned]
        lines.append({"file_name": "missing.png", "text": "a file that is not there"})
        lines.append({"file_name": "nocaption.png", "text": "   "})  # blank caption = no caption
        (src / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    elif captions == "csv":
        with open(src / "captions.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image", "caption"])
            for n in captioned + ["missing.png"]:
                w.writerow([n, f"caption of {n}"])
    else:
        for n in captioned:
            (src / n).with_suffix(".txt").write_text(f"caption of {n}\n")
    return src


def _expected_counts(with_missing: bool):
    skipped = {}
    for reason in EXPECTED.values():
        if reason:
            skipped[reason] = skipped.get(reason, 0) + 1
    if with_missing:
        skipped["missing file"] = 1
    imported = sum(r is None for r in EXPECTED.values())
    return imported, skipped, len(EXPECTED) + with_missing


@pytest.mark.parametrize("captions", ["jsonl", "csv", "sidecar"])
def test_import_counts_and_outputs(tmp_path, captions):
    src = make_src(tmp_path, captions)
    out = tmp_path / "out"
    s = import_folder(src, out, SIZE, max_pixels=MAX_PIXELS)
    imported, skipped, total = _expected_counts(with_missing=captions != "sidecar")
    assert s["imported"] == imported
    assert s["skipped"] == skipped
    assert s["total_seen"] == total
    rows = read_metadata(out)
    assert sorted(r["source"] for r in rows) == sorted(n for n, r in EXPECTED.items() if r is None)
    assert [r["file_name"] for r in rows] == [f"images/{i:06d}.png" for i in range(imported)]
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:06d}.png" for i in range(imported)]
    by_src = {}
    for r in rows:
        assert r["text"] == f"caption of {r['source']}"
        assert r["split"] in ("train", "val")
        img = Image.open(out / r["file_name"])
        assert img.mode == "RGB" and img.size == (SIZE, SIZE)
        by_src[r["source"]] = np.asarray(img).astype(int)
        if captions == "jsonl":
            assert r["photographer"] == "me"
    # RGBA: the fully transparent left half became white, the opaque right half stays red
    rgba = by_src["rgba.png"]
    assert (rgba[:, :6] >= 250).all() and (np.abs(rgba[:, 10:] - [255, 0, 0]) <= 3).all()
    # palette with a transparent index: transparent bottom half white, top half blue
    pal = by_src["palette.png"]
    assert (np.abs(pal[:5] - [0, 0, 255]) <= 3).all() and (pal[-5:] >= 250).all()
    assert (np.abs(by_src["gray.png"] - 100) <= 1).all()
    assert (by_src["gray16.png"] >= 254).all()  # 16-bit white stays white (not clipped garbage)
    r, g, b = by_src["cmyk.jpg"][8, 8]
    assert r > 200 and g < 60 and b < 60  # CMYK (0, 255, 255, 0) is red
    assert (np.abs(by_src["tiny.png"] - [10, 200, 30]) <= 1).all()  # 1x1 imports as a flat colour
    assert (np.abs(by_src["sub/nested.png"] - [0, 128, 0]) <= 1).all()


def test_deterministic_and_split_stable(tmp_path):
    src = make_src(tmp_path, "sidecar")
    a = import_folder(src, tmp_path / "a", SIZE, max_pixels=MAX_PIXELS, val_fraction=0.5, seed=3)
    b = import_folder(src, tmp_path / "b", SIZE, max_pixels=MAX_PIXELS, val_fraction=0.5, seed=3, workers=2)
    ra, rb = read_metadata(tmp_path / "a"), read_metadata(tmp_path / "b")
    assert ra == rb and a["skipped"] == b["skipped"]
    for r in ra:
        assert (tmp_path / "a" / r["file_name"]).read_bytes() == (tmp_path / "b" / r["file_name"]).read_bytes()
        assert r["split"] == assign_split(r["source"], 0.5, "folder:3")
    assert {r["split"] for r in ra} == {"train", "val"}


def test_min_side_and_split_column(tmp_path):
    src = make_src(tmp_path, "jsonl")
    lines = [json.loads(x) for x in (src / "metadata.jsonl").read_text().splitlines()]
    for x in lines:
        x["split"] = "validation" if x["file_name"] == "good2.png" else "train"
    (src / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    s = import_folder(src, tmp_path / "out", SIZE, max_pixels=MAX_PIXELS, min_side=2)
    assert s["skipped"]["too small"] == 1  # tiny.png
    rows = read_metadata(tmp_path / "out")
    assert {r["source"]: r["split"] for r in rows}["good2.png"] == "val"
    assert sum(r["split"] == "val" for r in rows) == 1


def test_output_inside_source_is_not_reimported(tmp_path):
    src = make_src(tmp_path, "sidecar")
    s1 = import_folder(src, src / "imported", SIZE, max_pixels=MAX_PIXELS)
    s2 = import_folder(src, src / "imported", SIZE, max_pixels=MAX_PIXELS)
    assert s1["total_seen"] == s2["total_seen"] == len(EXPECTED)
    with pytest.raises(ValueError):
        import_folder(src, src, SIZE)


def test_bad_caption_files_fail_loudly(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\n{broken\n')
    with pytest.raises(ValueError, match=r"metadata.jsonl:2"):
        import_folder(src, tmp_path / "out", SIZE)
    (src / "metadata.jsonl").unlink()
    (src / "c.csv").write_text("name,description\na.png,hello\n")
    with pytest.raises(ValueError, match="caption column"):
        import_folder(src, tmp_path / "out", SIZE)






