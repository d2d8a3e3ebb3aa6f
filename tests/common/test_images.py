"""Images: conversions to PIL (floats refused, not guessed), tensors from the VAE's [-1, 1], grids laid out
row-major, and folders of samples with their manifest."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from transfusion_mot.common.errors import InvalidInput
from transfusion_mot.common.images import image_grid, images_from_tensor, to_pil, to_uint8_array
from transfusion_mot.data.imageio import save_images


def test_to_uint8_array_layouts_and_refusals():
    hwc = np.arange(2 * 4 * 3, dtype=np.uint8).reshape(2, 4, 3)
    assert np.array_equal(to_uint8_array(hwc), hwc)
    assert np.array_equal(to_uint8_array(hwc.transpose(2, 0, 1)), hwc)  # (3, H, W)
    assert np.array_equal(to_uint8_array(torch.from_numpy(hwc)), hwc)
    grey = np.full((2, 2), 7, dtype=np.uint8)
    assert to_uint8_array(grey).shape == (2, 2, 3) and (to_uint8_array(grey) == 7).all()
    assert to_uint8_array(Image.new("L", (4, 2), 9)).shape == (2, 4, 3)
    with pytest.raises(InvalidInput, match="got an array of float32"):
        to_uint8_array(np.zeros((2, 2, 3), dtype=np.float32))
    with pytest.raises(InvalidInput, match="expected an image of shape"):
        to_uint8_array(np.zeros((2, 2, 5), dtype=np.uint8))
    rgb = Image.new("RGB", (2, 2))
    assert to_pil(rgb) is rgb and to_pil(hwc).size == (4, 2)


def test_images_from_tensor_maps_minus_one_one_to_bytes():
    x = torch.tensor([-1.0, -0.5, 0.0, 1.0, 2.0]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    (image,) = images_from_tensor(x)
    assert np.asarray(image)[0, :, 0].tolist() == [0, 64, 128, 255, 255]  # round((x + 1) * 127.5), clamped


def test_image_grid_layout():
    tiles = [Image.new("RGB", (4, 3), (10 * i, 0, 0)) for i in range(5)]
    grid = image_grid(tiles, cols=2, pad=1, background=(0, 0, 255))
    assert grid.size == (2 * (4 + 1) + 1, 3 * (3 + 1) + 1)
    a = np.asarray(grid)
    for i in range(5):  # row-major, pad pixels apart
        r, c = divmod(i, 2)
        assert tuple(a[1 + r * 4, 1 + c * 5]) == (10 * i, 0, 0)
    assert tuple(a[0, 0]) == (0, 0, 255) and tuple(a[-2, -2]) == (0, 0, 255)  # padding and the empty cell
    resized = image_grid(tiles[:1], cell=8)
    assert resized.size == (12, 12)
    assert image_grid(tiles).size == (3 * 6 + 2, 2 * 5 + 2)  # about square: 3 columns for 5
    with pytest.raises(InvalidInput, match="no images"):
        image_grid([])


def test_save_images_and_manifest(tmp_path):
    images = [Image.new("RGB", (2, 2), (i, i, i)) for i in range(3)]
    rows = save_images(images, tmp_path / "s", [{"prompt": f"p{i}"} for i in range(3)], start=5,
                       manifest={"cfg": 3.0})
    assert [r["file"] for r in rows] == ["00005.png", "00006.png", "00007.png"]
    assert np.asarray(Image.open(tmp_path / "s" / "00006.png"))[0, 0].tolist() == [1, 1, 1]
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest == {"cfg": 3.0, "images": rows}
    nested = save_images(images[:1], tmp_path / "b", [{}], name="images/{index:06d}.png", key="file_name")
    assert nested == [{"file_name": "images/000000.png"}] and (tmp_path / "b" / "images" / "000000.png").is_file()
    assert not (tmp_path / "b" / "manifest.json").exists()
    with pytest.raises(ValueError, match="2 images but 1 rows"):
        save_images(images[:2], tmp_path / "c", [{}])
