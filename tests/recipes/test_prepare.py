"""Built-in data for a run: shapes images, a tiny VAE, train and val latent caches, a BPE of the captions."""

import json

from transfusion_mot.recipes.train import train
from transfusion_mot.config import load_run_config, run_config_from_dict
from transfusion_mot.tokenizer import ByteTokenizer, load_tokenizer


def test_builtin_data_brings_val_split_and_bpe_tokenizer(tmp_path):
    """`data.builtin` with `tokenizer.kind: hf` and no path: images, VAE, train/val caches and a BPE of the
    captions are built, the resolved config records them, and held-out losses run on the val cache."""
    config = run_config_from_dict({
        "model": {"dim": 32, "n_layers": 1, "n_heads": 2, "ffn_dim": 64, "vocab_size": 356, "max_seq_len": 64},
        "tokenizer": {"kind": "hf", "max_text_tokens": 32},
        "data": {"builtin": "shapes", "builtin_dir": str(tmp_path / "data"), "builtin_num_images": 200,
                 "builtin_vae_steps": 2},
        "optim": {"warmup_steps": 1, "ema_decay": 0.0},
        "train": {"max_steps": 2, "batch_size": 4, "progress": False, "tensorboard": False, "device": "cpu",
                  "eval_every": 2, "eval_samples": 8}})
    train(config, tmp_path / "run")
    saved = load_run_config(tmp_path / "run" / "config.yaml")
    root = tmp_path / "data" / "shapes-32"
    assert saved.tokenizer.path == str(root / "tokenizer-356.json") and saved.data.val_path == str(root / "latents-val")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["validation"]["samples"] == 8 and summary["validation"]["source"] == str(root / "latents-val")
    words = ByteTokenizer().encode("a large red circle")
    assert len(load_tokenizer(saved.tokenizer).encode("a large red circle")) == 4 < len(words)  # a word, a token


def test_a_run_on_any_data_trains_its_bpe_on_that_data_s_training_captions(tmp_path):
    """training_captions reads a latent cache's sidecars, a folder's train rows and shards' captions (no
    image decoded), each the captions the data holds; the run's BPE is the one trained on them."""
    import webdataset as wds

    from helpers import make_training_data
    from transfusion_mot.data.imageio import read_metadata
    from transfusion_mot.recipes.prepare import train_data_tokenizer, training_captions
    from transfusion_mot.tokenizer import train_tokenizer

    d = make_training_data(tmp_path)
    with (d["folder"] / "metadata.jsonl").open("a") as f:  # held-out rows, which the BPE must not see
        f.write("".join(json.dumps({"file_name": "0.png", "text": f"zebra {i}", "split": "val"}) + "\n"
                        for i in range(3)))
    rows = read_metadata(d["folder"])
    train_rows = [r["text"] for r in rows if r.get("split", "train") == "train"]
    assert len(train_rows) == len(rows) - 3
    config = run_config_from_dict({"model": {"vocab_size": 300}, "tokenizer": {"kind": "hf"},
                                   "data": {"kind": "latents", "path": str(d["latents"])}})
    assert list(training_captions(config.data)) == train_rows  # the cache holds the train split, in order
    config.data.kind, config.data.path = "folder", str(d["folder"])
    assert list(training_captions(config.data)) == train_rows
    shard = tmp_path / "shard-000.tar"
    with wds.TarWriter(str(shard)) as sink:
        for i, text in enumerate(train_rows):
            sample = {"__key__": f"{i:04d}", "png": b"not decoded"}
            sample.update({"txt": text.encode()} if i % 2 else {"json": json.dumps({"caption": text}).encode()})
            sink.write(sample)
        sink.write({"__key__": "nocaption", "png": b"x"})
    config.data.kind, config.data.path = "webdataset", str(shard)
    assert list(training_captions(config.data)) == train_rows

    config.data.kind, config.data.path = "latents", str(d["latents"])
    tokenizer = train_data_tokenizer(config, tmp_path / "run" / "tokenizer.json")
    reference = train_tokenizer(train_rows, 300, tmp_path / "reference.json")
    assert (tmp_path / "run" / "tokenizer.json").read_text() == (tmp_path / "reference.json").read_text()
    assert tokenizer.vocab_size == reference.vocab_size
    assert not list((tmp_path / "run").glob(".tmp-*"))
