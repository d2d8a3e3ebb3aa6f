"""Training the VAE: the loss falls and the directory is complete, a killed run resumes bit for bit, half-written
checkpoints are ignored, the perceptual loss only from weights on disk. The same for a VQModel, whose code usage
is logged and whose dead codes restart where the data is."""

import json
from pathlib import Path

import pytest
import torch
from helpers import make_square_folder, tiny_vae_run_config

from transfusion_mot.common.checkpoint import latest_checkpoint as latest_in
from transfusion_mot.common.errors import ConfigError
from transfusion_mot.data.readers import ImageFolderReader
from vae import build_vae, encode_codes, evaluate_psnr, load_vae, load_vae_config, train_vae
from vae.autoencoder import pre_quant
from vae.train import VAETrainer

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "vae"
# vq-tiny-32 at its 1,000 steps on the shapes data (20k images, 1,000 held out): 32.4 dB held-out PSNR, all 256 codes
# in use (perplexity 190); the classifier reads colour 99.1% -> 98.8%, shape 99.1% -> 98.0%, all correct 99.1% ->
# 98.0% (originals -> reconstructions). At 300 steps it was 24.0 dB, colour 83.3%, shape 50.2%. Bounds with margin
VQ_MIN_USAGE = 0.9
VQ_MIN_PSNR = 30.0
VQ_MAX_ALIGN_DROP = {"colour": 0.04, "shape": 0.05}


def latest_checkpoint(out: Path):
    return latest_in(out / "checkpoints", legacy_marker="trainer.pt")


def tiny_vq_run_config(k: int = 16, **train):
    """tiny_vae_run_config's model as a VQModel with a codebook of `k` (8x8 codes of 16 px images)."""
    cfg = tiny_vae_run_config(**train)
    cfg.model.kind, cfg.model.num_vq_embeddings = "vq", k
    cfg.model.validate()
    return cfg


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


def test_vq_train_reduces_loss_and_logs_code_usage(tmp_path):
    data = make_square_folder(tmp_path / "data")
    cfg = tiny_vq_run_config(max_steps=60, save_every=30, dead_code_after=10, usage_window=10, lr=1e-3)
    torch.manual_seed(cfg.train.seed)
    untrained = build_vae(cfg.model).eval()
    summary = train_vae(cfg, data, tmp_path / "out", progress=False)
    out = tmp_path / "out"
    log = [json.loads(ln) for ln in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 61))
    assert set(log[0]) >= {"loss", "recon", "codebook", "commitment", "psnr", "codebook_usage", "perplexity",
                           "codes_restarted"} and "kl" not in log[0]
    assert sum(r["loss"] for r in log[-5:]) < 0.6 * sum(r["loss"] for r in log[:5])
    for r in log:
        assert 0 < r["codebook_usage"] <= 1 and 1 <= r["perplexity"] <= 16 + 1e-9
        assert r["loss"] == pytest.approx(r["recon"] + r["codebook"] + 0.25 * r["commitment"], rel=1e-5)
    assert log[0]["codebook_usage"] < 0.5  # diffusers' init: every code near 0, a few take all
    assert log[-1]["codebook_usage"] >= 0.75 and log[-1]["codes_restarted"] > 0  # restarts put them back to use
    assert summary["final"] == log[-1] and summary["latent_shape"] == [8, 8] and summary["codebook_size"] == 16
    assert "scaling_factor" not in summary
    vq = load_vae(out)
    assert type(vq).__name__ == "VQModel" and vq.config.scaling_factor == 1.0
    train_split = ImageFolderReader(data, split="train", size=16)
    assert evaluate_psnr(vq, train_split) > evaluate_psnr(untrained, train_split) + 3.0


def _far_code_trainer(tmp_path, data, dead_code_after: int) -> VAETrainer:
    """A VQ trainer whose code 5 sits far from every encoder output, so it is never the nearest."""
    cfg = tiny_vq_run_config(k=8, dead_code_after=dead_code_after, usage_window=4, lr=1e-3)
    trainer = VAETrainer(cfg, data, tmp_path / f"out{dead_code_after}", progress=False)
    with torch.no_grad():
        trainer.vae.quantize.embedding.weight[5] = 100.0
    return trainer


def test_dead_code_restarts_at_an_encoder_output(tmp_path):
    data = make_square_folder(tmp_path / "data", n=16)
    trainer = _far_code_trainer(tmp_path, data, dead_code_after=3)
    book = trainer.vae.quantize.embedding.weight
    for step in (1, 2):
        trainer.train_step(trainer.batch(step - 1), 1e-3, step)
        assert torch.all(book[5] == 100.0) and trainer.usage.restarted == 0 and trainer.usage.last_used[5] == 0
    x = trainer.batch(2)
    with torch.no_grad():
        h = pre_quant(trainer.vae, x)  # the encoder outputs step 3 sees (before its update)
    vectors = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])
    trainer.train_step(x, 1e-3, 3)  # code 5 unused for 3 steps: restarted
    assert trainer.usage.restarted >= 1 and trainer.usage.last_used[5] == 3
    assert bool((vectors == book[5]).all(1).any())  # moved onto one of this batch's encoder outputs, exactly
    moments = trainer.opt.state[book]
    assert not moments["exp_avg"][5].any() and not moments["exp_avg_sq"][5].any()  # a fresh start
    with torch.no_grad():
        assert 5 in encode_codes(trainer.vae, x).unique().tolist()  # and now in use
    # deterministic: the same run picks the same outputs; with restarts off the code stays where it was
    again = _far_code_trainer(tmp_path / "again", data, dead_code_after=3)
    off = _far_code_trainer(tmp_path, data, dead_code_after=0)
    for step in (1, 2, 3):
        again.train_step(again.batch(step - 1), 1e-3, step)
        off.train_step(off.batch(step - 1), 1e-3, step)
    assert torch.equal(again.vae.quantize.embedding.weight, book)
    assert torch.all(off.vae.quantize.embedding.weight[5] == 100.0) and off.usage.restarted == 0


def test_vq_killed_and_resumed_run_matches_uninterrupted(tmp_path):
    data = make_square_folder(tmp_path / "data")
    # restarts every few steps and a usage window across the checkpoint: both must come back exactly
    cfg = tiny_vq_run_config(max_steps=8, save_every=2, batch_size=8, hflip=True, dead_code_after=2, usage_window=3)
    full_summary = train_vae(cfg, data, tmp_path / "full", progress=False)
    train_vae(cfg, data, tmp_path / "part", max_steps=4, progress=False)
    assert latest_checkpoint(tmp_path / "part").name == "step_4"
    summary = train_vae(cfg, data, tmp_path / "part", max_steps=8, resume=True, progress=False)
    assert summary["resumed_from"] == 4 and summary["steps"] == 8 and full_summary["final"]["codes_restarted"] > 0
    full, part = _weights(tmp_path / "full"), _weights(tmp_path / "part")
    assert full.keys() == part.keys()
    for k in full:
        assert torch.equal(full[k], part[k]), k
    drop = ("time_s",)
    assert {k: v for k, v in summary["final"].items() if k not in drop} == {
        k: v for k, v in full_summary["final"].items() if k not in drop}


@pytest.mark.slow
def test_vq_tiny_32_keeps_colour_and_shape_of_the_shapes(tmp_path):
    """configs/vae/vq-tiny-32.yaml for its own steps on the built-in shapes data (as `prepare_builtin` makes it),
    then the alignment classifier reads colour and shape off the held-out reconstructions (decoded from the
    codes) about as well as off the originals. Minutes on a 2-core CPU."""
    from eval.align import score_alignment, train_shapes_classifier
    from transfusion_mot.common.images import images_from_tensor
    from transfusion_mot.data.shapes import generate_shapes
    from vae import decode_codes, psnr_per_image

    data = tmp_path / "shapes"
    generate_shapes(data, num=20000, size=32, seed=0, val_fraction=0.05, workers=2)
    cfg = load_vae_config(CONFIGS / "vq-tiny-32.yaml")
    summary = train_vae(cfg, data, tmp_path / "vq", progress=False)
    assert summary["steps"] == cfg.train.max_steps and summary["latent_shape"] == [8, 8]
    assert summary["final"]["codebook_usage"] >= VQ_MIN_USAGE
    vq = load_vae(tmp_path / "vq")
    val = ImageFolderReader(data, split="val", size=32)
    batch = val.batch(list(range(len(val))))
    with torch.no_grad():
        codes = encode_codes(vq, batch["image"])
        recon = decode_codes(vq, codes).clamp(-1, 1)
    assert len(codes.unique()) >= VQ_MIN_USAGE * cfg.model.num_vq_embeddings
    classifier = train_shapes_classifier(steps=1000, seed=0, eval_images=0)
    original = score_alignment(classifier, images_from_tensor(batch["image"]), batch["text"])
    decoded = score_alignment(classifier, images_from_tensor(recon), batch["text"])
    assert float(psnr_per_image(batch["image"], recon).mean()) >= VQ_MIN_PSNR
    for attr, drop in VQ_MAX_ALIGN_DROP.items():
        assert decoded[attr] >= original[attr] - drop, (attr, original[attr], decoded[attr])
