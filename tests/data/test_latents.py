"""Reading a latent cache: random access to what `tmot vae encode` wrote, its captions in order without
touching a latent, a cache of a VQModel's codes read as integers, and a damaged or missing cache named in one
line."""

import json

import pytest
import torch
from safetensors.torch import load_file

from transfusion_mot.common.errors import InputNotFound, InvalidInput
from transfusion_mot.data.imageio import read_metadata
from transfusion_mot.data.latents import LatentDataset, is_latent_cache
from transfusion_mot.data.streams import ShuffledStream


def test_items_are_the_rows_written(data):
    cache = data["latents"]
    ds = LatentDataset(cache)
    index = json.loads((cache / "index.json").read_text())
    written = torch.cat([load_file(str(cache / s["file"]))["latents"] for s in index["shards"]])
    assert len(ds) == index["count"] == len(written) and ds.latent_shape == tuple(index["latent_shape"])
    rows = read_metadata(data["folder"])
    for i in (0, 7, len(ds) - 1):
        item = ds[i]
        assert torch.equal(item["latent"], written[i].float())
        assert item["text"] == rows[item["index"]]["text"]
    assert list(ds.captions()) == [ds[i]["text"] for i in range(len(ds))]  # in order, from the sidecars alone
    stream = ShuffledStream(ds, seed=0)
    assert sorted(item["index"] for item in stream.take(len(ds))) == sorted(ds[i]["index"] for i in range(len(ds)))
    assert is_latent_cache(cache) and not is_latent_cache(data["folder"])
    assert ds.kind == "latents" and ds.codebook_size is None


def test_codes_cache_items_are_int64_codes(data, tmp_path):
    from vae import VAEConfig, build_vae, encode_folder

    torch.manual_seed(0)
    vq = build_vae(VAEConfig(kind="vq", block_out_channels=[8, 16], norm_num_groups=8, sample_size=16,
                             num_vq_embeddings=8))
    with torch.no_grad():
        vq.quantize.embedding.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    encode_folder(vq, data["folder"], tmp_path / "codes", batch_size=8, shard_size=10, progress=False)
    ds = LatentDataset(tmp_path / "codes")
    index = json.loads((tmp_path / "codes" / "index.json").read_text())
    written = torch.cat([load_file(str(tmp_path / "codes" / s["file"]))["latents"] for s in index["shards"]])
    assert ds.kind == "codes" and ds.codebook_size == 8 and ds.latent_shape == (8, 8) and written.dtype == torch.int64
    for i in (0, 11, len(ds) - 1):
        assert ds[i]["latent"].dtype == torch.int64 and torch.equal(ds[i]["latent"], written[i])
    assert 0 <= int(written.min()) and int(written.max()) < 8
    assert sorted(int(item["latent"].sum()) for item in ShuffledStream(ds, seed=0).take(len(ds))) == sorted(
        int(w.sum()) for w in written)


def test_missing_or_damaged_caches_are_one_line(data, tmp_path):
    with pytest.raises(InputNotFound, match="index.json: not found"):
        LatentDataset(tmp_path)
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(data["latents"], copy)
    shard = next(copy.glob("latents-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-10])  # cut short
    with pytest.raises(InvalidInput, match=f"damaged latent cache {copy}: {shard.name} has"):
        LatentDataset(copy)
    (copy / "index.json").write_text("{")
    with pytest.raises(InvalidInput, match="damaged latent cache index"):
        LatentDataset(copy)
