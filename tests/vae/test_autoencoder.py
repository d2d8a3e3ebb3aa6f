"""The autoencoder: strict configs, save/load, latent normalisation and its statistics, clear loading errors."""

from pathlib import Path

import pytest
import torch
from helpers import tiny_vae

from transfusion_mot.common.errors import ConfigError
from vae import (
    VAENotFoundError,
    build_vae,
    compute_latent_stats,
    decode,
    encode,
    load_vae,
    load_vae_config,
    set_latent_stats,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "vae"


def test_shipped_configs_give_8x8x4_latents():
    for name, size in (("tiny-32", 32), ("tiny-64", 64)):
        cfg = load_vae_config(CONFIGS / f"{name}.yaml")
        assert cfg.model.sample_size == size and cfg.model.latent_size == 8
        assert cfg.model.down_block_types == ("DownEncoderBlock2D",) * cfg.model.num_levels
        with torch.no_grad():
            z = encode(build_vae(cfg).eval(), torch.zeros(1, 3, size, size))
        assert z.shape == (1, 4, 8, 8)


def test_config_strict(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  sample_size: 32\n  latent_chanels: 4\n")
    with pytest.raises(ConfigError, match="unknown config key 'model.latent_chanels'"):
        load_vae_config(p)
    p.write_text("model:\n  block_out_channels: [32, 48]\n")
    with pytest.raises(ConfigError, match="multiple of norm_num_groups"):
        load_vae_config(p)
    p.write_text("train:\n  recon_loss: l3\n")
    with pytest.raises(ConfigError, match="recon_loss must be one of"):
        load_vae_config(p)
    cfg = load_vae_config(CONFIGS / "tiny-32.yaml", ["train.lr=0.01", "model.latent_channels=8"])
    assert cfg.train.lr == 0.01 and cfg.model.latent_channels == 8


def test_save_load_bit_identical(tmp_path):
    vae = tiny_vae()
    set_latent_stats(vae, shift_factor=0.25, scaling_factor=1.7)
    vae.save_pretrained(tmp_path / "v")
    assert (tmp_path / "v" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = load_vae(tmp_path / "v")
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        z1, z2 = encode(vae, x), encode(loaded, x)
        assert torch.equal(z1, z2)
        assert torch.equal(decode(vae, z1), decode(loaded, z2))
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        assert torch.equal(encode(vae, x, sample=True, generator=g1), encode(loaded, x, sample=True, generator=g2))
    assert loaded.config.scaling_factor == 1.7 and loaded.config.shift_factor == 0.25


def test_normalisation_is_consistent(tmp_path):
    vae = tiny_vae()
    set_latent_stats(vae, shift_factor=-0.5, scaling_factor=3.0)
    vae.save_pretrained(tmp_path / "v")
    vae = load_vae(tmp_path / "v")
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        raw = vae.encode(x).latent_dist.mean
        z = encode(vae, x)
        torch.testing.assert_close(z / 3.0 + -0.5, raw, rtol=0, atol=1e-6)
        torch.testing.assert_close(z, (raw + 0.5) * 3.0)
        torch.testing.assert_close(decode(vae, z), vae.decode(raw).sample, rtol=0, atol=1e-5)


def test_compute_latent_stats_matches_direct():
    vae = tiny_vae()
    g = torch.Generator().manual_seed(3)
    images = [torch.rand(3, 16, 16, generator=g) * 2 - 1 for _ in range(10)]
    stats = compute_latent_stats(vae, images, n=7, batch_size=3)
    with torch.no_grad():
        z = vae.encode(torch.stack(images[:7])).latent_dist.mean.double()
    assert stats.images == 7 and stats.count == z.numel()
    assert stats.mean == pytest.approx(float(z.mean()), abs=1e-7)  # batching changes float32 sums
    assert stats.std == pytest.approx(float(z.std()), rel=1e-6)
    assert stats.shift_factor == stats.mean and stats.scaling_factor == pytest.approx(1 / float(z.std()), rel=1e-6)
    # after set_latent_stats the normalised latents are zero-mean, unit-std on that data
    set_latent_stats(vae, stats.shift_factor, stats.scaling_factor)
    with torch.no_grad():
        zn = encode(vae, torch.stack(images[:7])).double()
    assert abs(float(zn.mean())) < 1e-5 and float(zn.std()) == pytest.approx(1.0, rel=1e-5)










def test_missing_vae_gives_clear_error(tmp_path):
    with pytest.raises(VAENotFoundError, match=r"no VAE at .*directory not found.*tmot vae train"):
        load_vae(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VAENotFoundError, match="expected config.json"):
        load_vae(tmp_path / "empty")
    with pytest.raises(VAENotFoundError, match="stabilityai/sd-vae-ft-ema") as err:  # HF_HUB_OFFLINE=1
        load_vae("nobody-here/not-a-vae")
    assert "\n" not in str(err.value)






