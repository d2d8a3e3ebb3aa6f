"""Resumable streams: the protocol every training source follows, a data set shuffled per epoch and split
between processes (resuming exactly, and re-split onto another number of processes with nothing skipped),
items decoded ahead by worker processes, WebDataset shards, and text documents."""

import io
import json
import multiprocessing

import pytest
import torch
from helpers import assert_workers_stop

from transfusion_mot.common.errors import InputNotFound, InvalidInput
from transfusion_mot.data.streams import (
    PrefetchedStream,
    Resplit,
    ResumableStream,
    ShardStream,
    ShuffledStream,
    read_text_documents,
)


def test_every_stream_of_a_run_follows_the_protocol(data):
    """From the shuffled data set to the packed rows, each stage of a run's micro-batches is a ResumableStream."""
    from helpers import make_config

    from transfusion_mot.common.distributed import DistInfo
    from transfusion_mot.tokenizer import ByteTokenizer
    from transfusion_mot.training.stream import build_training_data

    for packing in (False, True):
        built = build_training_data(make_config(data, data={"packing": packing}), ByteTokenizer(), DistInfo(),
                                    torch.device("cpu"))
        stages = [built.batches, built.mix, built.mix.pairs, built.mix.pairs.source]
        assert all(isinstance(stage, ResumableStream) for stage in stages)
    assert isinstance(PrefetchedStream(ShuffledStream([1, 2]), num_workers=1), ResumableStream)


class Ints:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


def test_stream_resumes_exactly_across_epochs():
    reference = ShuffledStream(Ints(7), seed=11)
    expected = [next(reference) for _ in range(30)]  # 4+ epochs
    for cut in (0, 3, 7, 12, 14, 29):
        s = ShuffledStream(Ints(7), seed=11)
        head = [next(s) for _ in range(cut)]
        state = s.state_dict()
        assert set(state) == {"epoch", "position", "seed"}
        resumed = ShuffledStream(Ints(7), seed=999)  # the state carries the seed
        resumed.load_state_dict(json.loads(json.dumps(state)))
        assert head + [next(resumed) for _ in range(30 - cut)] == expected
    for e in range(4):  # each epoch is a permutation, and epochs differ
        assert sorted(expected[7 * e:7 * e + 7]) == list(range(7))
    assert expected[:7] != expected[7:14]


def test_stream_rank_sharding_is_disjoint_and_covering():
    for n, world in ((10, 3), (12, 4), (5, 5)):
        per_rank = [ShuffledStream(Ints(n), seed=2, rank=r, world_size=world).epoch_order(1).tolist()
                    for r in range(world)]
        flat = [i for part in per_rank for i in part]
        assert sorted(flat) == list(range(n))  # disjoint and covering
        dropped = [ShuffledStream(Ints(n), seed=2, rank=r, world_size=world, drop_last=True).epoch_order(0)
                   for r in range(world)]
        assert len({len(d) for d in dropped}) == 1
    s = ShuffledStream(Ints(10), seed=2, rank=1, world_size=3)
    first_epoch = [next(s) for _ in range(len(s.epoch_order(0)))]
    assert first_epoch == s.epoch_order(0).tolist()
    with pytest.raises(ValueError):
        ShuffledStream(Ints(4), rank=2, world_size=2)
    with pytest.raises(InvalidInput, match="3 items cannot be shared by 4 processes"):
        ShuffledStream(Ints(3), rank=0, world_size=4)


@pytest.mark.parametrize("old_world,new_world,steps", [(2, 3, [5, 7]), (3, 1, [4, 4, 6]), (1, 2, [9]),
                                                       (2, 2, [11, 3])])
def test_resplit_to_another_world_size_skips_nothing(old_world, new_world, steps):
    """Ranks that consumed different numbers of items re-split onto another world size: every item no old
    rank had read is read exactly once in the rest of the epoch, and only items some old ranks had already
    read (beyond the slowest) are read again."""
    items = list(range(23))
    old = [ShuffledStream(items, seed=4, rank=r, world_size=old_world, drop_last=True) for r in range(old_world)]
    consumed = set()
    for stream, n in zip(old, steps):
        consumed |= {stream.next_index() for _ in range(n)}
    states = [s.state_dict() for s in old]
    new = [ShuffledStream(items, seed=4, rank=r, world_size=new_world, drop_last=True) for r in range(new_world)]
    read = []
    for stream in new:
        stream.load_resplit(states, Resplit(old_world, seed=0))
        order = stream.epoch_order(stream.epoch)
        read += order.tolist()
    assert len(read) == len(set(read))  # no item twice within the new split
    epoch_items = set(torch.randperm(23, generator=torch.Generator().manual_seed(4))[: 23 - 23 % old_world].tolist())
    unread = epoch_items - consumed
    assert unread <= set(read)  # nothing skipped ...
    assert len(set(read) - unread) <= max(steps) * old_world - min(steps) * old_world  # ... few repeats
    assert all(len(stream.epoch_order(stream.epoch)) == len(new[0].epoch_order(new[0].epoch)) for stream in new)
    # the state round-trips (start included) and later epochs are whole again
    again = ShuffledStream(items, seed=4, rank=0, world_size=new_world, drop_last=True)
    again.load_state_dict(new[0].state_dict())
    assert torch.equal(again.epoch_order(again.epoch), new[0].epoch_order(new[0].epoch))
    assert len(again.epoch_order(again.epoch + 1)) == (23 - 23 % new_world) // new_world


def test_text_documents_files(tmp_path):
    """The corpus is read by the shared text reader (tested in tests/common/test_files.py); here its field
    and the empty-corpus error."""
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"text": " a "}\n{"text": "b"}\n')
    assert read_text_documents(jsonl) == [" a ", "b"]  # documents are kept as written
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(InvalidInput, match="no documents"):
        read_text_documents(tmp_path / "empty.txt")
    with pytest.raises(InputNotFound, match="text-only corpus not found"):
        read_text_documents(tmp_path / "none.txt")


def test_worker_processes_deliver_the_same_items_and_resume_at_the_exact_next_one(data):
    """Folder images decoded by 2 DataLoader workers arrive in the order the training process would read
    them itself; the state taken after k items (the workers are ahead by then) resumes at item k + 1."""
    from transfusion_mot.data.readers import ImageFolderReader

    def order():
        return ShuffledStream(ImageFolderReader(data["folder"], split="train", size=16), seed=3, drop_last=True)

    plain = order()
    expected = [next(plain) for _ in range(30)]  # more than one epoch
    before = set(multiprocessing.active_children())
    prefetched = PrefetchedStream(order(), num_workers=2, prefetch_factor=2)
    got = [next(prefetched) for _ in range(11)]
    state = prefetched.state_dict()
    got += [next(prefetched) for _ in range(4)]
    assert_workers_stop(before, 2, prefetched.close)
    got += [next(prefetched) for _ in range(3)]  # closed, read on: new workers start at the delivered position
    prefetched.close()
    resumed = PrefetchedStream(order(), num_workers=2, prefetch_factor=2)
    resumed.load_state_dict(state)
    again = [next(resumed) for _ in range(19)]
    resumed.close()
    assert [g["key"] for g in got] == [e["key"] for e in expected[:18]]
    # dropped without close(): its last reference goes, and its workers stop with it (no reference cycle
    # leaves them to the garbage collector)
    before = set(multiprocessing.active_children())
    held = [PrefetchedStream(order(), num_workers=2, prefetch_factor=2)]
    next(held[0])
    assert_workers_stop(before, 2, held.clear)
    assert [g["key"] for g in again] == [e["key"] for e in expected[11:30]]
    assert all(torch.equal(g["image"], e["image"]) for g, e in zip(got + again, expected[:18] + expected[11:30]))


def test_shards_read_by_workers_resume_exactly(tmp_path):
    """WebDataset shards read by 2 workers: every sample once per epoch, the same stream every time (the
    shards are split between the workers, so it is not the in-process order), and an exact resume across an
    epoch boundary."""
    import webdataset as wds
    from PIL import Image

    from transfusion_mot.data.readers import WebDatasetReader

    urls = []
    for k in range(4):
        urls.append(str(tmp_path / f"shard-{k}.tar"))
        with wds.TarWriter(urls[-1]) as sink:
            for i in range(5):
                buf = io.BytesIO()
                Image.new("RGB", (8, 8), (40 * k, 40 * i, 0)).save(buf, format="PNG")
                sink.write({"__key__": f"{k}-{i}", "png": buf.getvalue(), "txt": f"shard {k} sample {i}".encode()})

    def reader():
        return WebDatasetReader(urls, shuffle_buffer=3, seed=1, size=8)

    straight = ShardStream(reader(), num_workers=2, prefetch_factor=2)
    expected = [next(straight)["key"] for _ in range(27)]
    assert sorted(expected[:20]) == sorted(f"{k}-{i}" for k in range(4) for i in range(5))
    straight.close()
    before = set(multiprocessing.active_children())
    workers = ShardStream(reader(), num_workers=2, prefetch_factor=2)
    got = [next(workers)["key"] for _ in range(6)]
    assert_workers_stop(before, 2, workers.close)
    got += [next(workers)["key"] for _ in range(3)]  # closed, read on: new workers start at the delivered sample
    state = workers.state_dict()
    workers.close()
    resumed = ShardStream(reader(), num_workers=2, prefetch_factor=2)
    resumed.load_state_dict(state)
    got += [next(resumed)["key"] for _ in range(18)]
    resumed.close()
    assert got == expected
