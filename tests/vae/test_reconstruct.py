"""Reconstruction checks: the side-by-side grid and PSNR on the uint8 images a PNG holds."""

import pytest
import torch
from helpers import make_square_folder, tiny_vae
from PIL import Image

from vae import psnr_per_image, reconstruct


def test_reconstruct_grid_and_psnr(tmp_path):
    data = make_square_folder(tmp_path / "data", n=12)
    vae = tiny_vae()
    vae.save_pretrained(tmp_path / "v")
    result = reconstruct(tmp_path / "v", data, tmp_path / "grid.png", n=16, split="val")
    assert result["n"] == 3 and len(result["psnr_per_image"]) == 3
    assert result["psnr"] == pytest.approx(sum(result["psnr_per_image"]) / 3, abs=1e-2)
    with Image.open(tmp_path / "grid.png") as im:
        assert im.size[0] > 2 * 16 and im.mode == "RGB"
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.allclose(psnr_per_image(x, x), torch.tensor([100.0, 100.0]))
    # one grey level off everywhere on the uint8 scale: 20 log10(255) = 48.13 dB
    y = torch.randint(0, 255, (1, 3, 8, 8)).float()
    assert float(psnr_per_image(y / 127.5 - 1, (y + 1) / 127.5 - 1)[0]) == pytest.approx(48.1308, abs=1e-3)
