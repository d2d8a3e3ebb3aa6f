"""Reconstruction checks: the side-by-side grid and PSNR on the uint8 images a PNG holds; a VQModel's round trip
through its codes, with codebook usage; `tmot vae train|encode|reconstruct` for a VQ config."""

import json

import pytest
import torch
import yaml
from helpers import make_square_folder, tiny_vae, tiny_vae_run_config
from PIL import Image

from transfusion_mot.cli import main
from transfusion_mot.common.config import to_dict
from transfusion_mot.data.latents import LatentDataset
from transfusion_mot.data.readers import ImageFolderReader
from vae import build_vae, decode_codes, encode_codes, evaluate_psnr, load_vae, psnr_per_image, reconstruct


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


def test_reconstruct_vq_goes_through_codes_and_reports_usage(tmp_path):
    data = make_square_folder(tmp_path / "data", n=12)
    cfg = tiny_vae_run_config().model
    cfg.kind, cfg.num_vq_embeddings = "vq", 16
    torch.manual_seed(0)
    vq = build_vae(cfg).eval()
    with torch.no_grad():
        vq.quantize.embedding.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    result = reconstruct(vq, data, tmp_path / "grid.png", n=16, split="val")
    x = ImageFolderReader(data, split="val", size=16).batch([0, 1, 2])["image"]
    with torch.no_grad():
        codes = encode_codes(vq, x)
        expected = psnr_per_image(x, decode_codes(vq, codes).clamp(-1, 1))
    assert result["psnr_per_image"] == pytest.approx(expected.tolist(), abs=1e-3)
    used = len(codes.unique())
    assert result["codebook_size"] == 16 and result["codes_used"] == used and result["codebook_usage"] == used / 16
    assert 1 <= result["perplexity"] <= used
    assert evaluate_psnr(vq, ImageFolderReader(data, split="val", size=16)) == pytest.approx(float(expected.mean()),
                                                                                           abs=1e-4)


def test_cli_trains_encodes_and_reconstructs_a_vq_model(tmp_path, capsys):
    data = make_square_folder(tmp_path / "data", n=12)
    cfg = to_dict(tiny_vae_run_config(max_steps=3, save_every=3))
    cfg["model"].update(kind="vq", num_vq_embeddings=16)
    (tmp_path / "vq.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["vae", "train", "--config", str(tmp_path / "vq.yaml"), "--data", str(data), "--out",
                 str(tmp_path / "vq")]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{"):])
    assert summary["codebook_size"] == 16 and summary["latent_shape"] == [8, 8] and "codebook_usage" in summary["final"]
    assert type(load_vae(tmp_path / "vq")).__name__ == "VQModel"
    assert main(["vae", "encode", "--vae", str(tmp_path / "vq"), "--data", str(data), "--out",
                 str(tmp_path / "codes")]) == 0
    ds = LatentDataset(tmp_path / "codes")
    assert ds.kind == "codes" and ds.codebook_size == 16 and ds[0]["latent"].dtype == torch.int64
    assert main(["vae", "reconstruct", "--vae", str(tmp_path / "vq"), "--data", str(data), "--out",
                 str(tmp_path / "grid.png")]) == 0
    out = capsys.readouterr().out
    assert "codes used" in out and (tmp_path / "grid.png").is_file()
