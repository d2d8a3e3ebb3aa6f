"""The VAE package: config, save/load, latent normalisation, statistics, training, resumption, errors."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from transfusion_mot.common.checkpoint import latest_checkpoint as latest_in
from transfusion_mot.common.errors import ConfigError
from transfusion_mot.data.readers import ImageFolderReader
from vae import (
    VAEConfig,
    VAENotFoundError,
    VAERunConfig,
    VAETrainConfig,
    build_vae,
    compute_latent_stats,
    decode,
    encode,
    evaluate_psnr,
    load_vae,
    load_vae_config,
    psnr_per_image,
    reconstruct,
    set_latent_stats,
    train_vae,
)


def latest_checkpoint(out: Path):
    return latest_in(out / "checkpoints", legacy_marker="trainer.pt")

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "vae"
COLOURS = [(255, 0, 0), (0, 200, 0), (0, 0, 255), (240, 240, 0), (0, 0, 0), (255, 255, 255), (120, 60, 200),
           (30, 160, 160)]


def make_folder(root: Path, n: int = 32, size: int = 16, val_every: int = 4) -> Path:
    """Solid squares on a coloured background, deterministic; every `val_every`-th image is "val"."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    rows = []
    for i in range(n):
        bg, fg = COLOURS[i % len(COLOURS)], COLOURS[(i * 3 + 1) % len(COLOURS)]
        im = Image.new("RGB", (size, size), bg)
        s = 3 + i % (size // 2 - 2)
        x0 = (i * 5) % (size - s)
        im.paste(fg, (x0, x0, x0 + s, x0 + s))
        name = f"images/{i:04d}.png"
        im.save(root / name)
        rows.append({"file_name": name, "text": f"square {i}", "split": "val" if i % val_every == 0 else "train",
                     "colour": i % len(COLOURS)})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def tiny_run_config(**train) -> VAERunConfig:
    base = dict(lr=3e-3, batch_size=8, max_steps=8, kl_weight=1e-4, lr_schedule="constant", warmup_steps=2,
                save_every=2, log_every=1, stats_samples=64, seed=0)
    base.update(train)
    # 4 channels per norm group: one channel per group would normalise the flat colours away
    return VAERunConfig(model=VAEConfig(block_out_channels=[16, 16], norm_num_groups=4, sample_size=16),
                        train=VAETrainConfig(**base))


def tiny_vae():
    torch.manual_seed(0)
    return build_vae(tiny_run_config().model).eval()


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


def _weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "diffusion_pytorch_model.safetensors"))


def test_train_reduces_loss_and_writes_directory(tmp_path):
    data = make_folder(tmp_path / "data")
    cfg = tiny_run_config(max_steps=60, save_every=25)
    torch.manual_seed(cfg.train.seed)
    untrained = build_vae(cfg.model).eval()  # train_vae's initial weights (same seed)
    summary = train_vae(cfg, data, tmp_path / "out", progress=False)
    out = tmp_path / "out"
    log = [json.loads(ln) for ln in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 61))
    assert set(log[0]) >= {"step", "loss", "recon", "kl", "psnr"}
    assert sum(r["loss"] for r in log[-5:]) < 0.6 * sum(r["loss"] for r in log[:5])
    train_split = ImageFolderReader(data, split="train", size=16)
    assert evaluate_psnr(load_vae(out), train_split) > evaluate_psnr(untrained, train_split) + 3.0
    assert (out / "config.json").is_file() and (out / "diffusion_pytorch_model.safetensors").is_file()
    assert load_vae_config(out / "vae_config.yaml").train.max_steps == 60
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_50", "step_60"]  # keep last 2
    assert summary["steps"] == 60 and summary["train_images"] == 24  # the train split only
    vae = load_vae(out)
    assert vae.config.scaling_factor == pytest.approx(summary["scaling_factor"])
    assert vae.config.shift_factor == pytest.approx(summary["shift_factor"])


def test_killed_and_resumed_run_matches_uninterrupted(tmp_path):
    data = make_folder(tmp_path / "data")
    cfg = tiny_run_config(max_steps=8, save_every=2, batch_size=8, hflip=True)
    train_vae(cfg, data, tmp_path / "full", progress=False)
    train_vae(cfg, data, tmp_path / "part", max_steps=4, progress=False)
    assert latest_checkpoint(tmp_path / "part").name == "step_4"
    summary = train_vae(cfg, data, tmp_path / "part", max_steps=8, resume=True, progress=False)
    assert summary["resumed_from"] == 4 and summary["steps"] == 8
    full, part = _weights(tmp_path / "full"), _weights(tmp_path / "part")
    assert full.keys() == part.keys()
    for k in full:
        assert torch.equal(full[k], part[k]), k
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "part" / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_resume_ignores_half_written_checkpoint(tmp_path):
    data = make_folder(tmp_path / "data", n=16)
    cfg = tiny_run_config(max_steps=2, save_every=2)
    train_vae(cfg, data, tmp_path / "o", progress=False)
    (tmp_path / "o" / "checkpoints" / ".tmp-step_4-abc").mkdir()  # a kill during the rename-to-be
    (tmp_path / "o" / "checkpoints" / "step_6").mkdir()  # no trainer.pt: incomplete
    assert latest_checkpoint(tmp_path / "o").name == "step_2"
    (tmp_path / "o" / "checkpoints" / "step_8").mkdir()
    torch.save({}, tmp_path / "o" / "checkpoints" / "step_8" / "trainer.pt")  # from an older run
    train_vae(cfg, data, tmp_path / "o", progress=False)  # fresh run: old checkpoints go
    assert sorted(p.name for p in (tmp_path / "o" / "checkpoints").iterdir()) == ["step_2"]


def test_missing_vae_gives_clear_error(tmp_path):
    with pytest.raises(VAENotFoundError, match=r"no VAE at .*directory not found.*tmot vae train"):
        load_vae(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VAENotFoundError, match="expected config.json"):
        load_vae(tmp_path / "empty")
    with pytest.raises(VAENotFoundError, match="stabilityai/sd-vae-ft-ema") as err:  # HF_HUB_OFFLINE=1
        load_vae("nobody-here/not-a-vae")
    assert "\n" not in str(err.value)


def test_perceptual_loss_needs_weights_on_disk(tmp_path):
    data = make_folder(tmp_path / "data", n=8)
    cfg = tiny_run_config(perceptual_weight=0.1, perceptual_weights_path=str(tmp_path / "vgg16.pth"))
    with pytest.raises(ConfigError, match="perceptual_weights_path .* is not a file") as err:
        train_vae(cfg, data, tmp_path / "out", progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()  # failed before doing any work


@pytest.mark.slow
def test_perceptual_loss_from_local_state_dict(tmp_path):
    from torchvision.models import vgg16

    torch.save(vgg16(weights=None).state_dict(), tmp_path / "vgg16.pth")
    data = make_folder(tmp_path / "data", n=8)
    cfg = tiny_run_config(max_steps=2, batch_size=4, perceptual_weight=0.1,
                          perceptual_weights_path=str(tmp_path / "vgg16.pth"))
    train_vae(cfg, data, tmp_path / "out", progress=False)
    log = [json.loads(ln) for ln in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert all("perceptual" in r for r in log)


def test_reconstruct_grid_and_psnr(tmp_path):
    data = make_folder(tmp_path / "data", n=12)
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
