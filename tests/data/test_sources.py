"""The three kinds of training data behind one interface: the kind told from the path, the training captions
of each (no image decoded), each process's share of the items, and the held-out items (or why there are none)."""

import json
from dataclasses import replace

import pytest
import webdataset as wds
from helpers import make_config

from transfusion_mot.common.errors import ConfigError, InputNotFound, InvalidInput
from transfusion_mot.data.imageio import read_metadata
from transfusion_mot.data.sources import ImageFolderSource, LatentCacheSource, ShardSource, data_kind, open_source


def shards(tmp_path, rows):
    """Shards of the folder's train rows: captions as .txt or json, one sample with none (passed over)."""
    path = tmp_path / "shard-000.tar"
    with wds.TarWriter(str(path)) as sink:
        for i, text in enumerate(rows):
            sample = {"__key__": f"{i:04d}", "png": b"not an image: never decoded for captions"}
            sample.update({"txt": text.encode()} if i % 2 else {"json": json.dumps({"caption": text}).encode()})
            sink.write(sample)
        sink.write({"__key__": "nocaption", "png": b"x"})
    return path


def test_the_kind_is_told_from_the_path(data, tmp_path):
    assert data_kind(data["latents"]) == "latents" and data_kind(data["folder"]) == "folder"
    assert data_kind(str(tmp_path / "shards-{000..009}.tar")) == "webdataset"
    with pytest.raises(InputNotFound, match="not found"):
        data_kind(tmp_path / "nowhere")
    with pytest.raises(InvalidInput, match="neither a latent cache"):
        data_kind(tmp_path)
    config = make_config(data)
    assert isinstance(open_source(replace(config.data, kind="auto")), LatentCacheSource)
    with pytest.raises(ConfigError, match="data.path is not set"):
        open_source(replace(config.data, path=None))


def test_each_kind_gives_its_training_captions(data, tmp_path):
    """A latent cache's sidecars, a folder's train rows and shards' captions are each the captions the data
    holds, in order; the folder's held-out rows are not among them."""
    with (data["folder"] / "metadata.jsonl").open() as f:
        original = f.read()
    try:
        with (data["folder"] / "metadata.jsonl").open("a") as f:  # held-out rows, which a BPE must not see
            f.write("".join(json.dumps({"file_name": "0.png", "text": f"zebra {i}", "split": "val"}) + "\n"
                            for i in range(3)))
        train_rows = [r["text"] for r in read_metadata(data["folder"], split="train")]
        spec = make_config(data).data
        assert list(open_source(spec).captions()) == train_rows  # the cache holds the train split, in order
        folder = open_source(replace(spec, kind="folder", path=str(data["folder"])))
        assert isinstance(folder, ImageFolderSource) and list(folder.captions()) == train_rows
        tar = shards(tmp_path, train_rows)
        assert list(ShardSource(replace(spec, kind="webdataset", path=str(tar))).captions()) == train_rows
    finally:
        (data["folder"] / "metadata.jsonl").write_text(original)


def test_items_are_this_process_s_share(data):
    spec = make_config(data).data
    source = open_source(spec)
    shares = [list(source.items(seed=3, rank=r, world_size=2, size=None).epoch_order(0).tolist()) for r in (0, 1)]
    assert set(shares[0]).isdisjoint(shares[1]) and len(shares[0]) == len(shares[1])
    folder = open_source(replace(spec, kind="folder", path=str(data["folder"]), num_workers=0))
    item = next(folder.items(seed=3, rank=0, world_size=1, size=16))
    assert tuple(item["image"].shape) == (3, 16, 16) and item["text"]


def test_held_out_items_or_why_there_are_none(data):
    spec = make_config(data).data
    cache = open_source(spec)
    assert cache.missing_held_out() == "data.val_path (held-out latents, --val-data) is not set"
    with pytest.raises(ConfigError, match="needs held-out latents"):
        cache.held_out(4, None)
    items, where = open_source(replace(spec, val_path=str(data["latents"]))).held_out(4, None)
    assert len(items) == 4 and where == str(data["latents"]) and "latent" in items[0]
    again, _ = open_source(replace(spec, val_path=str(data["latents"]))).held_out(4, None)
    assert [i["index"] for i in items] == [i["index"] for i in again]  # the same ones every time
    folder = open_source(replace(spec, kind="folder", path=str(data["folder"])))
    assert "has no rows of split 'val'" in folder.missing_held_out()
    train_split = open_source(replace(spec, kind="folder", path=str(data["folder"]), val_split="train"))
    assert train_split.missing_held_out() is None
    items, where = train_split.held_out(5, 16)
    assert len(items) == 5 and where.endswith("(split train)") and tuple(items[0]["image"].shape) == (3, 16, 16)
    shards_without_val = ShardSource(replace(spec, kind="webdataset", path="x.tar", val_path=None))
    assert shards_without_val.missing_held_out() == "data.val_path (held-out shards, --val-data) is not set"
