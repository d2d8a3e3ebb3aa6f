"""Training the VAE: the loss falls and the directory is complete, a killed run resumes bit for bit, half-written
checkpoints are ignored, the perceptual loss only from weights on disk."""

import json
from pathlib import Path

import pytest
import torch
from helpers import make_square_folder, tiny_vae_run_config

from transfusion_mot.common.checkpoint import latest_checkpoint as latest_in
from transfusion_mot.common.errors import ConfigError
from transfusion_mot.data.readers import ImageFolderReader
from vae import build_vae, evaluate_psnr, load_vae, load_vae_config, train_vae


def latest_checkpoint(out: Path):
    return latest_in(out / "checkpoints", legacy_marker="trainer.pt")


def _weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "diffusion_pytorch_model.safetensors"))


def test_train_reduces_loss_and_writes_directory(tmp_path):
    data = make_square_folder(tmp_path / "data")
    cfg = tiny_vae_run_config(max_steps=60, save_every=25)
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
    data = make_square_folder(tmp_path / "data")
    cfg = tiny_vae_run_config(max_steps=8, save_every=2, batch_size=8, hflip=True)
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
    data = make_square_folder(tmp_path / "data", n=16)
    cfg = tiny_vae_run_config(max_steps=2, save_every=2)
    train_vae(cfg, data, tmp_path / "o", progress=False)
    (tmp_path / "o" / "checkpoints" / ".tmp-step_4-abc").mkdir()  # a kill during the rename-to-be
    (tmp_path / "o" / "checkpoints" / "step_6").mkdir()  # no trainer.pt: incomplete
    assert latest_checkpoint(tmp_path / "o").name == "step_2"
    (tmp_path / "o" / "checkpoints" / "step_8").mkdir()
    torch.save({}, tmp_path / "o" / "checkpoints" / "step_8" / "trainer.pt")  # from an older run
    train_vae(cfg, data, tmp_path / "o", progress=False)  # fresh run: old checkpoints go
    assert sorted(p.name for p in (tmp_path / "o" / "checkpoints").iterdir()) == ["step_2"]


def test_perceptual_loss_needs_weights_on_disk(tmp_path):
    data = make_square_folder(tmp_path / "data", n=8)
    cfg = tiny_vae_run_config(perceptual_weight=0.1, perceptual_weights_path=str(tmp_path / "vgg16.pth"))
    with pytest.raises(ConfigError, match="perceptual_weights_path .* is not a file") as err:
        train_vae(cfg, data, tmp_path / "out", progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()  # failed before doing any work


@pytest.mark.slow
def test_perceptual_loss_from_local_state_dict(tmp_path):
    from torchvision.models import vgg16

    torch.save(vgg16(weights=None).state_dict(), tmp_path / "vgg16.pth")
    data = make_square_folder(tmp_path / "data", n=8)
    cfg = tiny_vae_run_config(max_steps=2, batch_size=4, perceptual_weight=0.1,
                          perceptual_weights_path=str(tmp_path / "vgg16.pth"))
    train_vae(cfg, data, tmp_path / "out", progress=False)
    log = [json.loads(ln) for ln in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert all("perceptual" in r for r in log)
