"""Latent caches (encode_folder -> LatentDataset) and the resumable, rank-sharded LatentStream."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vae import LatentDataset, LatentStream, VAEConfig, build_vae, encode, encode_folder, load_vae, set_latent_stats


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


def direct_latents(vae_dir, data, indices):
    vae = load_vae(vae_dir)
    x = torch.stack([
        torch.from_numpy(np.array(Image.open(data / f"{i}.png").convert("RGB"))).permute(2, 0, 1)
        .float() / 127.5 - 1 for i in indices])
    with torch.no_grad():
        return encode(vae, x)


def test_cache_round_trip(tmp_path, vae_dir):
    data = make_folder(tmp_path / "data", 11)
    index = encode_folder(vae_dir, data, tmp_path / "cache", batch_size=4, shard_size=5, progress=False)
    assert index["count"] == 11 and [s["count"] for s in index["shards"]] == [5, 5, 1]
    assert index["latent_shape"] == [4, 8, 8]
    assert index["scaling_factor"] == 2.0 and index["shift_factor"] == pytest.approx(0.1)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        "index.json", "latents-00000.jsonl", "latents-00000.safetensors", "latents-00001.jsonl",
        "latents-00001.safetensors", "latents-00002.jsonl", "latents-00002.safetensors"]
    ds = LatentDataset(tmp_path / "cache")
    assert len(ds) == 11 and ds.latent_shape == (4, 8, 8) and ds.scaling_factor == 2.0
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


def test_missing_cache_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="index.json: not found"):
        LatentDataset(tmp_path)


class Ints:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


def test_stream_resumes_exactly_across_epochs():
    reference = LatentStream(Ints(7), seed=11)
    expected = [next(reference) for _ in range(30)]  # 4+ epochs
    for cut in (0, 3, 7, 12, 14, 29):
        s = LatentStream(Ints(7), seed=11)
        head = [next(s) for _ in range(cut)]
        state = s.state_dict()
        assert set(state) == {"epoch", "position", "seed"}
        resumed = LatentStream(Ints(7), seed=999)  # the state carries the seed
        resumed.load_state_dict(json.loads(json.dumps(state)))
        assert head + [next(resumed) for _ in range(30 - cut)] == expected
    for e in range(4):  # each epoch is a permutation, and epochs differ
        assert sorted(expected[7 * e:7 * e + 7]) == list(range(7))
    assert expected[:7] != expected[7:14]


def test_stream_rank_sharding_is_disjoint_and_covering():
    for n, world in ((10, 3), (12, 4), (5, 5)):
        per_rank = [LatentStream(Ints(n), seed=2, rank=r, world_size=world).epoch_order(1).tolist()
                    for r in range(world)]
        flat = [i for part in per_rank for i in part]
        assert sorted(flat) == list(range(n))  # disjoint and covering
        dropped = [LatentStream(Ints(n), seed=2, rank=r, world_size=world, drop_last=True).epoch_order(0)
                   for r in range(world)]
        assert len({len(d) for d in dropped}) == 1
    s = LatentStream(Ints(10), seed=2, rank=1, world_size=3)
    first_epoch = [next(s) for _ in range(len(s.epoch_order(0)))]
    assert first_epoch == s.epoch_order(0).tolist()
    with pytest.raises(ValueError):
        LatentStream(Ints(4), rank=2, world_size=2)


def test_stream_over_latent_dataset(tmp_path, vae_dir):
    data = make_folder(tmp_path / "data", 6)
    encode_folder(vae_dir, data, tmp_path / "c", shard_size=4, progress=False)
    ds = LatentDataset(tmp_path / "c")
    s = LatentStream(ds, seed=0)
    batch = s.take(6)
    assert sorted(b["index"] for b in batch) == list(range(6))
    for b in batch:
        assert b["text"] == f"caption {b['index']}"


@pytest.mark.parametrize("old_world,new_world,steps", [(2, 3, [5, 7]), (3, 1, [4, 4, 6]), (1, 2, [9]),
                                                       (2, 2, [11, 3])])
def test_resplit_to_another_world_size_skips_nothing(old_world, new_world, steps):
    """Ranks that consumed different numbers of items re-split onto another world size: every item no old
    rank had read is read exactly once in the rest of the epoch, and only items some old ranks had already
    read (beyond the slowest) are read again."""
    items = list(range(23))
    old = [LatentStream(items, seed=4, rank=r, world_size=old_world, drop_last=True) for r in range(old_world)]
    consumed = set()
    for stream, n in zip(old, steps):
        consumed |= {stream.next_index() for _ in range(n)}
    states = [s.state_dict() for s in old]
    new = [LatentStream(items, seed=4, rank=r, world_size=new_world, drop_last=True) for r in range(new_world)]
    read = []
    for stream in new:
        stream.load_resplit(states, old_world)
        order = stream.epoch_order(stream.epoch)
        read += order.tolist()
    assert len(read) == len(set(read))  # no item twice within the new split
    epoch_items = set(torch.randperm(23, generator=torch.Generator().manual_seed(4))[: 23 - 23 % old_world].tolist())
    unread = epoch_items - consumed
    assert unread <= set(read)  # nothing skipped ...
    assert len(set(read) - unread) <= max(steps) * old_world - min(steps) * old_world  # ... few repeats
    assert all(len(stream.epoch_order(stream.epoch)) == len(new[0].epoch_order(new[0].epoch)) for stream in new)
    # the state round-trips (start included) and later epochs are whole again
    again = LatentStream(items, seed=4, rank=0, world_size=new_world, drop_last=True)
    again.load_state_dict(new[0].state_dict())
    assert torch.equal(again.epoch_order(again.epoch), new[0].epoch_order(new[0].epoch))
    assert len(again.epoch_order(again.epoch + 1)) == (23 - 23 % new_world) // new_world
