"""The autoencoder: strict configs, save/load, latent normalisation and its statistics, clear loading errors; the
VQModel's codes (nearest codebook entries), their decoding, and loading either class."""

import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_vae, tiny_vae_run_config

from transfusion_mot.common.errors import ConfigError, InvalidInput
from vae import (
    VAEConfig,
    VAENotFoundError,
    build_vae,
    codebook_size,
    compute_latent_stats,
    decode,
    decode_codes,
    encode,
    encode_codes,
    is_vq,
    latent_scale_shift,
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


def tiny_vq(k: int = 16, spread: float = 1.0):
    """A 16 px VQModel (2 levels: 8x8 codes) whose codebook is spread out (`spread` * N(0, 1)) so that nearest
    codes are far from ties; diffusers' own init (uniform in +-1/K) puts every code near 0."""
    cfg = tiny_vae_run_config().model
    cfg.kind, cfg.num_vq_embeddings = "vq", k
    torch.manual_seed(0)
    vq = build_vae(cfg).eval()
    with torch.no_grad():
        vq.quantize.embedding.weight.copy_(torch.randn(k, 4, generator=torch.Generator().manual_seed(1)) * spread)
    return vq


def images(n: int, seed: int, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_vq_config_builds_a_vqmodel():
    cfg = load_vae_config(CONFIGS / "vq-tiny-32.yaml")
    assert cfg.model.kind == "vq" and cfg.model.latent_size == 8 and cfg.model.downsample_factor == 4
    torch.manual_seed(0)
    vq = build_vae(cfg)
    assert type(vq).__name__ == "VQModel" and is_vq(vq) and not is_vq(tiny_vae())
    assert vq.config.lookup_from_codebook and vq.config.scaling_factor == 1.0
    assert codebook_size(vq) == cfg.model.num_vq_embeddings and codebook_size(tiny_vae()) is None
    assert latent_scale_shift(vq) == (1.0, 0.0)
    assert vq.quantize.embedding.weight.shape == (cfg.model.num_vq_embeddings, cfg.model.latent_channels)
    with torch.no_grad():
        codes = encode(vq.eval(), torch.zeros(2, 3, 32, 32))
    assert codes.shape == (2, 8, 8) and codes.dtype == torch.int64
    assert build_vae(VAEConfig(kind="vq", vq_embed_dim=8)).quantize.embedding.weight.shape[1] == 8
    with pytest.raises(ConfigError, match=r"kind must be one of \['kl', 'vq'\], got 'vqgan'"):
        VAEConfig(kind="vqgan")
    with pytest.raises(ConfigError, match="num_vq_embeddings must be at least 2"):
        VAEConfig(kind="vq", num_vq_embeddings=1)
    with pytest.raises(ConfigError, match="vq_embed_dim must be positive"):
        VAEConfig(kind="vq", vq_embed_dim=0)


def test_encode_codes_is_the_nearest_code():
    vq = tiny_vq(k=16)
    x = images(3, 2)
    with torch.no_grad():
        codes = encode_codes(vq, x)
        h = vq.encode(x).latents.double()  # (B, D, h, w), the encoder's output before quantisation
        _, _, (_, _, diffusers_codes) = vq.quantize(vq.encode(x).latents)
    book = vq.quantize.embedding.weight.detach().double()
    assert codes.shape == (3, 8, 8) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < 16 and len(codes.unique()) > 3
    for b in range(3):
        for i in range(8):
            for j in range(8):
                distances = [float(((h[b, :, i, j] - book[k]) ** 2).sum()) for k in range(16)]
                assert int(codes[b, i, j]) == min(range(16), key=distances.__getitem__)
    assert torch.equal(codes.flatten(), diffusers_codes.flatten())  # diffusers' quantiser agrees (cdist)
    assert torch.equal(encode(vq, x), codes)  # encode() of a VQModel gives its codes


def test_decode_codes_is_the_models_own_reconstruction():
    vq = tiny_vq(k=16)
    x = images(2, 3)
    with torch.no_grad():
        codes = encode_codes(vq, x)
        ours = decode_codes(vq, codes)
        # diffusers' path: quantise inside forward (straight-through: z + (e - z), so equal to float rounding)
        torch.testing.assert_close(ours, vq(x).sample, rtol=0, atol=1e-5)
        # and its lookup path (lookup_from_codebook) bit for bit
        b, h, w = codes.shape
        looked_up = vq.decode(codes.flatten(), force_not_quantize=True, shape=(b, h, w, 4)).sample
        assert torch.equal(ours, looked_up) and ours.shape == (2, 3, 16, 16)
        assert torch.equal(decode(vq, codes), ours) and torch.equal(decode(vq, codes.int()), ours)
    with pytest.raises(InvalidInput, match="a VQModel decodes integer codes") as err:
        decode(vq, codes.float())
    assert "\n" not in str(err.value)
    with pytest.raises(InvalidInput, match=r"codes must lie in \[0, 16\)"):
        decode_codes(vq, codes + 16)
    with pytest.raises(InvalidInput, match="an AutoencoderKL decodes float latents"):
        decode(tiny_vae(), codes)
    with pytest.raises(InvalidInput, match="VQModel's codes need none"):
        compute_latent_stats(vq, [x[0]])


def test_load_vae_picks_the_class_and_keeps_the_codes(tmp_path):
    vq, kl = tiny_vq(k=16), tiny_vae()
    vq.save_pretrained(tmp_path / "vq")
    kl.save_pretrained(tmp_path / "kl")
    assert (tmp_path / "vq" / "diffusion_pytorch_model.safetensors").is_file()
    loaded_vq, loaded_kl = load_vae(tmp_path / "vq"), load_vae(tmp_path / "kl")
    assert type(loaded_vq).__name__ == "VQModel" and type(loaded_kl).__name__ == "AutoencoderKL"
    assert not loaded_vq.training and not any(p.requires_grad for p in loaded_vq.parameters())
    x = images(4, 4)
    with torch.no_grad():
        assert torch.equal(encode_codes(loaded_vq, x), encode_codes(vq, x))
        assert torch.equal(decode(loaded_vq, encode(loaded_vq, x)), decode(vq, encode(vq, x)))
    # a config.json without _class_name (older diffusers) is an AutoencoderKL; another class is named in one line
    config = json.loads((tmp_path / "kl" / "config.json").read_text())
    del config["_class_name"]
    (tmp_path / "kl" / "config.json").write_text(json.dumps(config))
    assert type(load_vae(tmp_path / "kl")).__name__ == "AutoencoderKL"
    (tmp_path / "kl" / "config.json").write_text(json.dumps({**config, "_class_name": "UNet2DModel"}))
    with pytest.raises(VAENotFoundError, match=r"holds a UNet2DModel, not one of \['AutoencoderKL', 'VQModel'\]") as err:
        load_vae(tmp_path / "kl")
    assert "\n" not in str(err.value)
