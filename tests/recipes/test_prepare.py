"""What a run needs before its trainer: built-in data (shapes images, a tiny VAE, train and val latent caches)
and a BPE of the training captions."""

import json

from transfusion_mot.config import load_run_config, run_config_from_dict
from transfusion_mot.recipes.train import train
from transfusion_mot.tokenizer import ByteTokenizer, load_tokenizer


def builtin_shapes_config(tmp_path, **model):
    """A toy run on the built-in shapes (200 images, 2 autoencoder steps) with a BPE of the captions and
    held-out losses at step 2; `model` changes model keys."""
    return run_config_from_dict({
        "model": {"dim": 32, "n_layers": 1, "n_heads": 2, "ffn_dim": 64, "vocab_size": 356, "max_seq_len": 64, **model},
        "tokenizer": {"kind": "hf", "max_text_tokens": 32},
        "data": {"builtin": "shapes", "builtin_dir": str(tmp_path / "data"), "builtin_num_images": 200,
                 "builtin_vae_steps": 2},
        "optim": {"warmup_steps": 1, "ema_decay": 0.0},
        "train": {"max_steps": 2, "batch_size": 4, "progress": False, "tensorboard": False, "device": "cpu",
                  "eval_every": 2, "eval_samples": 8}})


def test_builtin_data_brings_val_split_and_bpe_tokenizer(tmp_path):
    """`data.builtin` with `tokenizer.kind: hf` and no path: images, VAE, train/val caches and a BPE of the
    captions are built, the resolved config records them, and held-out losses run on the val cache."""
    config = builtin_shapes_config(tmp_path)
    train(config, tmp_path / "run")
    saved = load_run_config(tmp_path / "run" / "config.yaml")
    root = tmp_path / "data" / "shapes-32"
    # the run's BPE of the training captions, as for any data; the built-in data's held-out cache
    assert saved.tokenizer.path == str(tmp_path / "run" / "tokenizer.json") and saved.data.val_path == str(root / "latents-val")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["validation"]["samples"] == 8 and summary["validation"]["source"] == str(root / "latents-val")
    words = ByteTokenizer().encode("a large red circle")
    assert len(load_tokenizer(saved.tokenizer).encode("a large red circle")) == 4 < len(words)  # a word, a token


def test_builtin_data_for_a_model_of_image_tokens_brings_a_vq_tokenizer_and_code_caches(tmp_path):
    """With image_objective tokens the same images get a VQ tokenizer and train/val caches of code grids beside
    the VAE's (vq/, codes/, codes-val/); held-out losses are next-code NLLs, with no timestep quarters."""
    from transfusion_mot.data.latents import LatentDataset

    config = builtin_shapes_config(tmp_path, max_seq_len=96, image_objective="tokens", codebook_size=256)
    train(config, tmp_path / "run")
    root = tmp_path / "data" / "shapes-32"
    saved = load_run_config(tmp_path / "run" / "config.yaml")
    assert (saved.data.path, saved.data.val_path, saved.vae.path) == (
        str(root / "codes"), str(root / "codes-val"), str(root / "vq"))
    cache = LatentDataset(root / "codes")
    assert cache.kind == "codes" and cache.codebook_size == 256 and cache[0]["latent"].shape == (8, 8)
    evaluation = json.loads((tmp_path / "run" / "summary.json").read_text())["validation"]["final"]
    assert 0 < evaluation["val_image_loss"] and not any(k.startswith("val_image_loss_t") for k in evaluation)


def test_a_run_on_any_data_trains_its_bpe_on_that_data_s_training_captions(tmp_path, data):
    """RUN/tokenizer.json is the BPE trained on the data's training captions (each kind's captions are tested in
    tests/data/test_sources.py), trained once: a resumed run keeps it."""
    from helpers import make_config

    from transfusion_mot.data.sources import open_source
    from transfusion_mot.tokenizer import train_tokenizer

    config = make_config(data, tokenizer={"kind": "hf"}, model={"vocab_size": 300}, train={"max_steps": 1})
    train(config, tmp_path / "run")
    reference = train_tokenizer(open_source(config.data).captions(), 300, tmp_path / "reference.json")
    assert (tmp_path / "run" / "tokenizer.json").read_text() == (tmp_path / "reference.json").read_text()
    saved = load_run_config(tmp_path / "run" / "config.yaml")
    assert saved.model.vocab_size == reference.vocab_size and saved.tokenizer.path == str(tmp_path / "run" / "tokenizer.json")
    assert not list((tmp_path / "run").glob(".tmp-*"))
