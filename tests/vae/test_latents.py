"""Latent caches (encode_folder -> LatentDataset), also read through a shuffled stream; code caches of a VQModel."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from transfusion_mot.common.errors import InvalidInput
from transfusion_mot.data.latents import LatentDataset
from vae import VAEConfig, build_vae, encode, encode_codes, encode_folder, load_vae, set_latent_stats


def make_folder(root: Path, n: int, size: int = 16) -> Path:
    root.mkdir(parents=True)
    rows = []
    for i in range(n):
        im = Image.new("RGB", (size, size), ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256))
        im.paste((255 - (i * 37) % 256, 0, 128), (i % 8, i % 8, i % 8 + 6, i % 8 + 6))
        im.save(root / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"caption {i}", "split": "val" if i % 3 == 0 else "train",
                     "shade": i * 37 % 256})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture
def vae_dir(tmp_path):
    torch.manual_seed(0)
    vae = build_vae(VAEConfig(block_out_channels=[8, 16], norm_num_groups=8, sample_size=16))
    set_latent_stats(vae, shift_factor=0.1, scaling_factor=2.0)
    vae.save_pretrained(tmp_path / "vae")
    return tmp_path / "vae"


@pytest.fixture
def vq_dir(tmp_path):
    torch.manual_seed(0)
    vq = build_vae(VAEConfig(kind="vq", block_out_channels=[8, 16], norm_num_groups=8, sample_size=16,
                             num_vq_embeddings=32))
    with torch.no_grad():  # spread the codebook (diffusers starts it within +-1/K) so several codes are used
        vq.quantize.embedding.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    vq.save_pretrained(tmp_path / "vq")
    return tmp_path / "vq"


def read_images(data, indices):
    return torch.stack([
        torch.from_numpy(np.array(Image.open(data / f"{i}.png").convert("RGB"))).permute(2, 0, 1)
        .float() / 127.5 - 1 for i in indices])


def direct_latents(vae_dir, data, indices):
    vae = load_vae(vae_dir)
    with torch.no_grad():
        return encode(vae, read_images(data, indices))


def test_cache_round_trip(tmp_path, vae_dir):
    data = make_folder(tmp_path / "data", 11)
    index = encode_folder(vae_dir, data, tmp_path / "cache", batch_size=4, shard_size=5, progress=False)
    assert index["count"] == 11 and [s["count"] for s in index["shards"]] == [5, 5, 1]
    assert index["latent_shape"] == [4, 8, 8] and index["kind"] == "latents" and "codebook_size" not in index
    assert index["scaling_factor"] == 2.0 and index["shift_factor"] == pytest.approx(0.1)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        "index.json", "latents-00000.jsonl", "latents-00000.safetensors", "latents-00001.jsonl",
        "latents-00001.safetensors", "latents-00002.jsonl", "latents-00002.safetensors"]
    ds = LatentDataset(tmp_path / "cache")
    assert len(ds) == 11 and ds.latent_shape == (4, 8, 8) and ds.scaling_factor == 2.0
    assert ds.kind == "latents" and ds.codebook_size is None
    expected = direct_latents(vae_dir, data, range(11))
    for i in range(11):
        item = ds[i]
        assert item["index"] == i and item["text"] == f"caption {i}" and item["meta"]["shade"] == i * 37 % 256
        assert item["latent"].dtype == torch.float32
        torch.testing.assert_close(item["latent"], expected[i], rtol=0, atol=1e-6)
    assert ds[-1]["index"] == 10
    with pytest.raises(IndexError):
        ds[11]
    clone = pickle.loads(pickle.dumps(ds))  # DataLoader workers
    assert torch.equal(clone[7]["latent"], ds[7]["latent"])


def test_cache_split_modes_and_dtype(tmp_path, vae_dir):
    data = make_folder(tmp_path / "data", 9)
    index = encode_folder(vae_dir, data, tmp_path / "val", split="val", mode="mean_logvar", dtype="bfloat16",
                          progress=False)
    ds = LatentDataset(tmp_path / "val")
    assert [ds[i]["index"] for i in range(len(ds))] == [0, 3, 6] and index["split"] == "val"
    item = ds[1]
    assert item["latent"].dtype == torch.float32 and set(item) >= {"logvar", "latent"}
    torch.testing.assert_close(item["latent"], direct_latents(vae_dir, data, [3])[0].bfloat16().float())
    # sampled caches are reproducible given the seed
    a = encode_folder(vae_dir, data, tmp_path / "s1", mode="sample", seed=3, progress=False)
    encode_folder(vae_dir, data, tmp_path / "s2", mode="sample", seed=3, progress=False)
    assert a["mode"] == "sample"
    assert torch.equal(LatentDataset(tmp_path / "s1")[4]["latent"], LatentDataset(tmp_path / "s2")[4]["latent"])
    assert not torch.equal(LatentDataset(tmp_path / "s1")[4]["latent"], direct_latents(vae_dir, data, [4])[0])


def test_reencoding_smaller_removes_stale_shards(tmp_path, vae_dir):
    data = make_folder(tmp_path / "data", 9)
    encode_folder(vae_dir, data, tmp_path / "c", shard_size=3, progress=False)
    encode_folder(vae_dir, data, tmp_path / "c", shard_size=5, progress=False)
    assert len(list((tmp_path / "c").glob("latents-*.safetensors"))) == 2
    assert len(LatentDataset(tmp_path / "c")) == 9


def test_codes_cache_round_trip(tmp_path, vq_dir):
    data = make_folder(tmp_path / "data", 11)
    index = encode_folder(vq_dir, data, tmp_path / "codes", batch_size=4, shard_size=5, progress=False)
    assert index["kind"] == "codes" and index["codebook_size"] == 32 and index["latent_shape"] == [8, 8]
    assert index["dtype"] == "int64" and index["mode"] == "mean" and index["normalized"] is False
    assert (index["scaling_factor"], index["shift_factor"]) == (1.0, 0.0) and index["count"] == 11
    assert json.loads((tmp_path / "codes" / "index.json").read_text()) == index
    ds = LatentDataset(tmp_path / "codes")
    assert ds.kind == "codes" and ds.codebook_size == 32 and ds.latent_shape == (8, 8) and len(ds) == 11
    with torch.no_grad():
        expected = encode_codes(load_vae(vq_dir), read_images(data, range(11)))
    assert len(expected.unique()) > 2
    for i in range(11):
        item = ds[i]
        assert item["latent"].dtype == torch.int64 and item["latent"].shape == (8, 8)
        assert torch.equal(item["latent"], expected[i]) and item["text"] == f"caption {i}"
    assert torch.equal(pickle.loads(pickle.dumps(ds))[7]["latent"], expected[7])


def test_codes_cache_refuses_other_modes(tmp_path, vq_dir):
    data = make_folder(tmp_path / "data", 3)
    for mode in ("sample", "mean_logvar"):
        with pytest.raises(InvalidInput, match=f"mode '{mode}' needs an AutoencoderKL's posterior.*use mode 'mean'") \
                as err:
            encode_folder(vq_dir, data, tmp_path / "codes", mode=mode, progress=False)
        assert "\n" not in str(err.value)
    assert not (tmp_path / "codes").exists()  # refused before any work


def test_old_cache_without_kind_is_latents(tmp_path, vae_dir):
    data = make_folder(tmp_path / "data", 3)
    encode_folder(vae_dir, data, tmp_path / "cache", progress=False)
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    del index["kind"]
    (tmp_path / "cache" / "index.json").write_text(json.dumps(index))
    ds = LatentDataset(tmp_path / "cache")
    assert ds.kind == "latents" and ds.codebook_size is None and ds[0]["latent"].dtype == torch.float32
