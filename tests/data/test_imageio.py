"""The image-folder contract: decoding any broken file into a countable reason, colour modes to RGB, the
centre crop, metadata.jsonl written atomically and read strictly."""

import numpy as np
import pytest
from PIL import Image

from transfusion_mot.data.imageio import BadImage, center_crop_resize, load_rgb, read_metadata, write_metadata


def test_load_rgb_bomb_and_reasons(tmp_path):
    p = tmp_path / "big.png"
    Image.new("RGB", (200, 100)).save(p)
    with pytest.raises(BadImage) as e:
        load_rgb(p, max_pixels=19_999)
    assert e.value.reason == "too large"
    assert load_rgb(p, max_pixels=20_000).size == (200, 100)
    with pytest.raises(BadImage) as e:
        load_rgb(tmp_path / "absent.png")
    assert e.value.reason == "missing file"
    # Pillow's own bomb guard (header claims ~2.9 G pixels) is reported, not raised
    w = h = 54_000
    ihdr = w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    import zlib
    chunk = lambda t, d: len(d).to_bytes(4, "big") + t + d + zlib.crc32(t + d).to_bytes(4, "big")  # noqa: E731
    (tmp_path / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    with pytest.raises(BadImage) as e:
        load_rgb(tmp_path / "bomb.png", max_pixels=None)
    assert e.value.reason == "too large"


def test_center_crop_resize_and_metadata_io(tmp_path):
    a = np.zeros((10, 30, 3), np.uint8)
    a[:, 10:20] = 255  # white centre square, black sides that the crop removes
    out = center_crop_resize(Image.fromarray(a), 5)
    assert out.size == (5, 5) and (np.asarray(out) >= 250).all()
    write_metadata(tmp_path, [{"file_name": "x.png", "text": "é", "split": "train", "k": [1, 2]}])
    assert read_metadata(tmp_path) == [{"file_name": "x.png", "text": "é", "split": "train", "k": [1, 2]}]
    assert read_metadata(tmp_path, split="val") == []
    assert [p.name for p in tmp_path.iterdir()] == ["metadata.jsonl"]
    with pytest.raises(ValueError):
        write_metadata(tmp_path, [{"file_name": "x.png"}])
    assert read_metadata(tmp_path)[0]["text"] == "é"  # a failed write leaves the old file intact


@pytest.mark.parametrize("mode,value,expected", [
    ("LA", (50, 0), (255, 255, 255)),       # fully transparent gray -> white
    ("LA", (50, 255), (50, 50, 50)),
    ("PA", (0, 0), (255, 255, 255)),
    ("1", 1, (255, 255, 255)),
    ("I", 70000, (255, 255, 255)),          # 32-bit above 16-bit range: scaled by its max
    ("I;16", 32896, (128, 128, 128)),       # 16-bit mid gray
    ("F", 0.5, (128, 128, 128)),            # float 0..1
    ("YCbCr", (76, 85, 255), (254, 0, 0)),  # red
    ("HSV", (0, 255, 255), (255, 0, 0)),
])
def test_to_rgb_modes(mode, value, expected):
    from transfusion_mot.data.imageio import to_rgb

    img = to_rgb(Image.new(mode, (4, 4), value))
    assert img.mode == "RGB"
    assert np.abs(np.asarray(img)[0, 0].astype(int) - expected).max() <= 2, np.asarray(img)[0, 0]
