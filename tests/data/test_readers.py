import io
import json
import warnings

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from transfusion_mot.data.readers import (
    ImageFolderReader,
    WebDatasetReader,
    center_crop_resize,
    expand_braces,
    expand_urls,
)

pytestmark = pytest.mark.filterwarnings("ignore:skipping")


def pixels(i: int, size: int = 8) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, (size, size + 2, 3), dtype=np.uint8)


def encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def caption(i: int) -> str:
    return f"sample {i}: a shape 🦄 number {i}"


def write_shards(root, sizes, corrupt=()):
    """Shards with sizes[k] samples each; keys are global indices. Even i: png + txt, odd i: jpg + json."""
    urls, keys, i = [], [], 0
    for k, n in enumerate(sizes):
        path = root / f"shard-{k:03d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for _ in range(n):
                key = f"{i:06d}"
                if i % 2 == 0:
                    sample = {"__key__": key, "png": encode(pixels(i), "PNG"), "txt": caption(i).encode()}
                else:
                    sample = {"__key__": key, "jpg": encode(pixels(i), "JPEG"),
                              "json": json.dumps({"caption": caption(i), "width": 10}).encode()}
                if i in corrupt:
                    sample["png" if i % 2 == 0 else "jpg"] = b"\x89PNG\r\n\x1a\n garbage"
                sink.write(sample)
                keys.append(key)
                i += 1
        urls.append(str(path))
    return urls, keys


def keys_of(samples):
    return [s["key"] for s in samples]


def take(iterator, n):
    out = []
    for s in iterator:
        out.append(s)
        if len(out) == n:
            break
    return out


# -- braces -------------------------------------------------------------------------------------------


def test_expand_braces():
    assert expand_braces("s-{000..003}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar", "s-003.tar"]
    assert expand_braces("{a,b}/x-{8..10}") == ["a/x-8", "a/x-9", "a/x-10", "b/x-8", "b/x-9", "b/x-10"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    assert expand_braces("x{0..4..2}") == ["x0", "x2", "x4"]
    assert expand_braces("a{x}b-{0..1}") == ["a{x}b-0", "a{x}b-1"]
    assert expand_braces("{09..11}") == ["09", "10", "11"]
    assert expand_urls("a-{0..1}.tar::b.tar") == ["a-0.tar", "a-1.tar", "b.tar"]
    assert expand_urls(["a-{0..1}.tar", "c.tar"]) == ["a-0.tar", "a-1.tar", "c.tar"]


# -- image folder -------------------------------------------------------------------------------------


def make_folder(root, n=6, corrupt=(2,)):
    rows = []
    for i in range(n):
        name = f"img/{i}.png"
        (root / "img").mkdir(parents=True, exist_ok=True)
        data = encode(pixels(i), "PNG")
        if i in corrupt:
            data = data[: len(data) // 2]  # truncated
        (root / name).write_bytes(data)
        rows.append({"file_name": name, "text": caption(i), "split": "val" if i == 5 else "train", "label": i})
    rows.append({"file_name": "img/missing.png", "text": "gone", "split": "train"})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_image_folder_skips_and_counts_corrupt(tmp_path):
    make_folder(tmp_path)
    reader = ImageFolderReader(tmp_path, split="train")
    assert len(reader) == 6  # 0..4 and missing (5 is val)
    got = list(reader)
    assert [s["meta"]["label"] for s in got] == [0, 1, 3, 4]
    assert reader.skipped == 2  # truncated 2.png and the missing file
    s = got[0]
    assert s["text"] == caption(0) and s["key"] == "img/0.png" and s["meta"]["split"] == "train"
    assert np.array_equal(np.asarray(s["image"]), pixels(0))
    # __getitem__ on a bad index falls through to the next good one, never raises
    again = ImageFolderReader(tmp_path, split="train")
    assert again[2]["meta"]["label"] == 3 and again.skipped == 1
    assert again[5]["meta"]["label"] == 0  # missing file at the end wraps around
    loader = torch.utils.data.DataLoader(again, batch_size=None)
    assert len(list(loader)) == 6


def test_image_folder_verify_split_and_transform(tmp_path):
    make_folder(tmp_path)
    reader = ImageFolderReader(tmp_path, size=4, verify=True)
    assert len(reader) == 5 and reader.skipped == 2
    img = reader[0]["image"]
    assert img.shape == (3, 4, 4) and img.dtype == torch.float32
    assert -1.0 <= img.min() and img.max() <= 1.0
    val = ImageFolderReader(tmp_path, split="val")
    assert [s["meta"]["label"] for s in val] == [5]
    custom = ImageFolderReader(tmp_path, split="val", transform=lambda im: im.size)
    assert custom[0]["image"] == (10, 8)
    with pytest.raises(FileNotFoundError, match="metadata.jsonl"):
        ImageFolderReader(tmp_path / "nope")


def test_image_folder_index_cache_and_batches(tmp_path):
    """`index` is the row of metadata.jsonl (latents join back to it); the cache returns what decoding does;
    `batches` skips unreadable files (encoding a cache must never substitute another image)."""
    make_folder(tmp_path)
    reader = ImageFolderReader(tmp_path, split="train", size=4, cache=True)
    assert [reader[i]["index"] for i in (0, 1, 3)] == [0, 1, 3]
    fresh = ImageFolderReader(tmp_path, split="train", size=4)
    for i in (0, 1, 3):
        assert torch.equal(reader[i]["image"], fresh[i]["image"])
        assert torch.equal(reader[i]["image"], fresh[i]["image"])  # the second read comes from the cache
    assert set(reader._cache) >= {0, 1, 3}
    batches = list(ImageFolderReader(tmp_path, split="train", size=4).batches(3))
    assert [b["index"].tolist() for b in batches] == [[0, 1, 3], [4]]
    assert batches[0]["image"].shape == (3, 3, 4, 4) and batches[0]["text"][2] == caption(3)
    assert batches[0]["key"] == ["img/0.png", "img/1.png", "img/3.png"]
    b = fresh.batch([0, 2])  # a position's bad image is replaced by the next good one (training batches)
    assert b["index"].tolist() == [0, 3]
    assert len(ImageFolderReader(tmp_path, split="test")) == 0


def test_center_crop_resize():
    im = Image.fromarray(pixels(0, 8))  # 10 wide, 8 high
    out = center_crop_resize(im, 8)
    assert out.size == (8, 8)
    assert np.array_equal(np.asarray(out), pixels(0, 8)[:, 1:9])


# -- webdataset: round trip ---------------------------------------------------------------------------


def test_webdataset_round_trip(tmp_path):
    urls, keys = write_shards(tmp_path, [7, 5, 6])
    reader = WebDatasetReader(str(tmp_path / "shard-{000..002}.tar"), shuffle_buffer=4, seed=1)
    for _ in range(2):  # two epochs: every key exactly once each
        got = list(reader)
        assert sorted(keys_of(got)) == keys
        for s in got:
            i = int(s["key"])
            assert s["text"] == caption(i)
            assert s["image"].mode == "RGB" and s["image"].size == (10, 8)
            if i % 2 == 0:
                assert np.array_equal(np.asarray(s["image"]), pixels(i))  # png: exact
                assert s["meta"] == {}
            else:
                assert s["meta"] == {"caption": caption(i), "width": 10}
                expected = Image.open(io.BytesIO(encode(pixels(i), "JPEG"))).convert("RGB")
                assert np.array_equal(np.asarray(s["image"]), np.asarray(expected))  # the decoded jpeg
    assert reader.epoch == 2 and reader.skipped == 0
    sized = WebDatasetReader(urls, size=4)
    s = next(iter(sized))
    assert s["image"].shape == (3, 4, 4) and s["image"].dtype == torch.float32


def test_webdataset_decode_errors_skipped_and_counted(tmp_path):
    urls, keys = write_shards(tmp_path, [6, 6], corrupt={3, 8})
    reader = WebDatasetReader(urls, shuffle_buffer=3)
    got = keys_of(reader)
    assert sorted(got) == [k for k in keys if int(k) not in (3, 8)]
    assert reader.skipped == 2
    # damaged shards: a truncated one keeps what is readable (Python's tarfile reads a cut at a member
    # boundary as a normal end), a file that is not a tar is reported; neither raises
    data = open(urls[1], "rb").read()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2 + 100])
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar file" * 40)
    partial = WebDatasetReader([urls[0], str(cut), str(junk)], shuffle_buffer=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = keys_of(partial)
    assert set(k for k in keys[:6] if k != "000003") < set(got) <= set(keys) and len(got) < 10
    assert len(partial.errors) == 1 and "junk.tar" in partial.errors[0]


# -- webdataset: sharding -----------------------------------------------------------------------------


@pytest.mark.parametrize("sizes,world", [([4, 3, 5, 2, 4, 3], 3), ([5, 4], 3), ([9], 2)])
def test_rank_sharding_disjoint_and_complete(tmp_path, sizes, world):
    urls, keys = write_shards(tmp_path, sizes)
    for epoch in range(2):
        per_rank = []
        for rank in range(world):
            reader = WebDatasetReader(urls, shuffle_buffer=5, seed=3, rank=rank, world_size=world)
            reader.set_epoch(epoch)
            per_rank.append(keys_of(reader))
        flat = [k for ks in per_rank for k in ks]
        assert sorted(flat) == keys  # union is everything, nothing twice
        assert all(per_rank)


@pytest.mark.parametrize("sizes", [[4, 3, 5, 2, 4, 3, 2, 5], [6, 5, 7]])
def test_rank_and_worker_plans_partition_shards(tmp_path, sizes):
    urls, keys = write_shards(tmp_path, sizes)
    world, workers = 2, 2
    for epoch in range(3):
        plans = [WebDatasetReader(urls, rank=r, world_size=world).consumer_plan(epoch, w, workers)
                 for r in range(world) for w in range(workers)]
        if len(urls) >= world * workers:
            shards = [u for p in plans for u in p[0]]
            assert sorted(shards) == sorted(urls)  # each shard read by exactly one consumer
            assert all(p[1] == 1 for p in plans)
        # whatever the plan, the samples kept are a partition
        kept = []
        for r in range(world):
            for w in range(workers):
                reader = WebDatasetReader(urls, shuffle_buffer=1, rank=r, world_size=world)
                kept += [s["__key__"] for s in reader._raw_stream(epoch, w, workers)]
        assert sorted(kept) == keys


def test_dataloader_workers_shard_and_cover(tmp_path):
    urls, keys = write_shards(tmp_path, [4, 3, 5, 2, 4, 3])
    got = []
    for rank in range(2):
        reader = WebDatasetReader(urls, shuffle_buffer=4, rank=rank, world_size=2)
        for batch in reader.loader(batch_size=2, num_workers=2):
            got += keys_of(batch)
    assert sorted(got) == keys


# -- webdataset: shuffling ----------------------------------------------------------------------------


def test_shuffle_depends_on_seed_and_epoch_only(tmp_path):
    urls, keys = write_shards(tmp_path, [8, 8, 8])

    def epoch_keys(seed, epoch):
        reader = WebDatasetReader(urls, shuffle_buffer=6, seed=seed)
        reader.set_epoch(epoch)
        return keys_of(reader)

    a = epoch_keys(0, 0)
    assert a == epoch_keys(0, 0)  # deterministic
    assert sorted(a) == keys and a != keys
    assert a != epoch_keys(1, 0)  # seed changes it
    assert a != epoch_keys(0, 1)  # epoch reshuffles
    reader = WebDatasetReader(urls, shuffle_buffer=6, seed=0)
    assert keys_of(reader) == a and keys_of(reader) == epoch_keys(0, 1)  # iterating advances the epoch


# -- webdataset: resume -------------------------------------------------------------------------------


def test_resume_main_process_exact(tmp_path):
    urls, keys = write_shards(tmp_path, [7, 5, 6], corrupt={4})  # 17 good samples per epoch
    make = lambda: WebDatasetReader(urls, shuffle_buffer=5, seed=7)  # noqa: E731
    full = make()
    ref = [s for _ in range(4) for s in full]  # 4 uninterrupted epochs
    assert len(ref) == 68
    for cut in (5, 17, 37):  # mid-epoch, exactly at an epoch boundary, in a later epoch
        reader = make()
        head = []
        while len(head) < cut:
            head += take(iter(reader), cut - len(head))
        assert keys_of(head) == keys_of(ref[:cut])
        state = reader.state_dict()
        # stopping right after an epoch's last sample leaves the reader at the end of that epoch
        assert (state["epoch"], state["consumed"]) == {5: (0, 5), 17: (0, 17), 37: (2, 3)}[cut]
        state = json.loads(json.dumps(state))  # survives a checkpoint
        resumed = make()
        resumed.load_state_dict(state)
        tail = []
        while len(tail) < 68 - cut:
            tail += list(resumed)
        assert keys_of(tail) == keys_of(ref[cut:]), cut
        assert [s["text"] for s in tail] == [s["text"] for s in ref[cut:]]


def test_resume_from_epoch_and_consumed_only(tmp_path):
    urls, _ = write_shards(tmp_path, [7, 5, 6])
    full = WebDatasetReader(urls, shuffle_buffer=5, seed=2)
    ref = [s["key"] for _ in range(3) for s in full]
    reader = WebDatasetReader(urls, shuffle_buffer=5, seed=2)
    reader.load_state_dict({"epoch": 2, "consumed": 3})
    assert keys_of(reader) == ref[18 * 2 + 3:]


@pytest.mark.parametrize("cut_batches", [1, 3, 5, 7, 12])
def test_resume_with_dataloader_workers(tmp_path, cut_batches):
    """2 workers with uneven shares (in epoch 0 worker 0 has 5 samples, worker 1 has 21: it runs alone
    from batch 5 on), batches of 3, a corrupt sample; resume mid-epoch, after a worker has finished, and
    in the next epoch."""
    urls, keys = write_shards(tmp_path, [12, 2, 3, 9], corrupt={10})
    make = lambda: WebDatasetReader(urls, shuffle_buffer=4, seed=5)  # noqa: E731
    full = make()
    loader = full.loader(batch_size=3, num_workers=2)
    ref = [keys_of(b) for _ in range(2) for b in loader]
    assert [len(b) for b in ref[:9]] == [3, 3, 2, 3, 3, 3, 3, 3, 2]  # the uneven case this test is about
    assert sorted(k for b in ref[:9] for k in b) == [k for k in keys if k != "000010"]
    reader = make()
    loader = reader.loader(batch_size=3, num_workers=2)
    head = []
    while len(head) < cut_batches:
        for batch in loader:
            head.append(keys_of(batch))
            if len(head) == cut_batches:
                break
    assert head == ref[:cut_batches]
    state = json.loads(json.dumps(reader.state_dict()))
    resumed = make()
    resumed.load_state_dict(state)
    rl = resumed.loader(batch_size=3, num_workers=2)
    tail = [keys_of(b) for b in rl]
    if resumed.epoch < 2:
        tail += [keys_of(b) for b in rl]
    assert tail == ref[cut_batches:]
    assert resumed.epoch == 2


def test_workers_zero_and_one_give_the_same_stream(tmp_path):
    urls, _ = write_shards(tmp_path, [5, 6, 4])
    a = keys_of(WebDatasetReader(urls, shuffle_buffer=4, seed=9))
    b = [s["key"] for batch in WebDatasetReader(urls, shuffle_buffer=4, seed=9).loader(batch_size=2,
                                                                                      num_workers=1)
         for s in batch]
    assert a == b


def test_resume_needs_same_worker_count(tmp_path):
    urls, _ = write_shards(tmp_path, [5, 6, 4])
    reader = WebDatasetReader(urls)
    take(iter(reader), 3)
    state = reader.state_dict()
    other = WebDatasetReader(urls)
    other.load_state_dict(state)
    # refused here, before any worker starts (a worker's error would come back as "Caught InvalidInput in
    # DataLoader worker process 0")
    with pytest.raises(ValueError, match=r"^this reader's state was saved with num_workers=1;.*\(got 2\)$"):
        list(other.loader(batch_size=2, num_workers=2))


def test_persistent_workers_rejected(tmp_path):
    urls, _ = write_shards(tmp_path, [2])
    with pytest.raises(ValueError, match="persistent_workers"):
        WebDatasetReader(urls).loader(num_workers=1, persistent_workers=True)
