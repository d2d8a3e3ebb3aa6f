"""Training-data readers: an image folder (metadata.jsonl) and WebDataset tar shards (img2dataset layout).

Both yield dicts `{"image": PIL RGB image or tensor, "text": str, "key": str, "meta": dict}`. With `size`
(and no `transform`) the image becomes a float tensor (3, size, size) in [-1, 1] (centre crop + resize);
with `transform` the PIL image goes through it; with neither it stays a PIL image.

Corrupt or undecodable images never stop a run: they are skipped and counted (`reader.skipped`).

`WebDatasetReader` is streaming, sharded (by rank and by DataLoader worker), shuffled with a seed, and
resumable to the exact sample; see its docstring for how.
"""

from __future__ import annotations

import io
import json
import random
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from ..common.errors import InvalidInput
from .imageio import center_crop_resize, read_metadata, to_rgb
from .streams import Resplit

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
Transform = Callable[[Image.Image], Any]


# --------------------------------------------------------------------------------------------------
# images


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor (3, H, W) in [-1, 1] (the range the VAE expects)."""
    arr = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


class CenterCropResize:
    """The default transform: centre crop, resize to `size`, float (3, size, size) in [-1, 1].

    A class, not a closure, so readers pickle into DataLoader workers under spawn/forkserver too."""

    def __init__(self, size: int) -> None:
        self.size = int(size)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return to_tensor(center_crop_resize(image, self.size))


def default_transform(size: int) -> Transform:
    return CenterCropResize(size)


def _pick_transform(size: int | None, transform: Transform | None) -> Transform | None:
    if transform is not None:
        return transform
    if size is not None:
        if int(size) <= 0:
            raise InvalidInput(f"size must be positive, got {size}")
        return default_transform(int(size))
    return None


def decode_image(data: bytes) -> Image.Image:
    """Fully decode (so truncated files fail here, not later) and convert to RGB (alpha onto white)."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return to_rgb(img)


# --------------------------------------------------------------------------------------------------
# image folder


class ImageFolderReader(Dataset):
    """Map-style dataset over DIR/metadata.jsonl rows `{"file_name", "text", "split"?, ...}`: the one reader of
    image folders (training, VAE training and encoding, validation).

    split: None keeps every row; "train"/"val" keeps that split, where a row without `split` counts as
    "train". Items: {"image", "text", "key": file_name, "index": the row's number in metadata.jsonl (so
    latents and attributes join back to their row), "meta": the row's other fields}.

    Corrupt images: with `verify=True` every image is decoded once up front and the bad ones are dropped
    (exact `len`). Without it (the default, no start-up cost) a bad image found in `__getitem__` is
    replaced by the next good index, deterministically, so a DataLoader never crashes; iterating
    (`__iter__`, `batches`) skips bad images instead. `skipped` counts the distinct bad files seen by this
    process (DataLoader workers count in their own copies). `cache=True` keeps decoded images in memory
    (uint8 for tensors in [-1, 1]: 3 KB per 32 px image), which keeps CPU training from waiting on PNGs.
    """

    def __init__(self, root: str | Path, split: str | None = None, size: int | None = None,
                 transform: Transform | None = None, verify: bool = False, cache: bool = False) -> None:
        self.root = Path(root)
        self.split = split
        self.transform = _pick_transform(size, transform)
        all_rows = read_metadata(self.root)
        self.rows: list[dict[str, Any]] = []
        self.indices: list[int] = []  # row number in metadata.jsonl of each item
        for i, row in enumerate(all_rows):
            if split is None or row.get("split", "train") == split:
                self.rows.append(row)
                self.indices.append(i)
        self._bad: set[int] = set()
        self._cache: dict[int, Any] | None = {} if cache else None
        self.skipped = 0
        if verify:
            good = [k for k, row in enumerate(self.rows) if self._readable(row)]
            self.skipped = len(self.rows) - len(good)
            self.rows, self.indices = [self.rows[k] for k in good], [self.indices[k] for k in good]

    def _readable(self, row: dict[str, Any]) -> bool:
        try:
            decode_image((self.root / row["file_name"]).read_bytes())
            return True
        except Exception:
            return False

    def __len__(self) -> int:
        return len(self.rows)

    def _image(self, index: int) -> Any:
        if self._cache is not None and index in self._cache:
            cached = self._cache[index]
            return cached.float().div_(127.5).sub_(1.0) if isinstance(cached, torch.Tensor) else cached
        image = decode_image((self.root / self.rows[index]["file_name"]).read_bytes())
        if self.transform is not None:
            image = self.transform(image)
        if self._cache is not None:
            is_tensor = isinstance(image, torch.Tensor)
            self._cache[index] = ((image + 1) * 127.5).round().to(torch.uint8) if is_tensor else image
        return image

    def _load(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        image = self._image(index)
        meta = {k: v for k, v in row.items() if k not in ("file_name", "text")}
        return {"image": image, "text": row.get("text", row.get("caption")), "key": row["file_name"],
                "index": self.indices[index], "meta": meta}

    def _mark_bad(self, index: int, err: Exception, warn: bool) -> None:
        self._bad.add(index)
        self.skipped = len(self._bad)
        if warn:
            warnings.warn(f"skipping unreadable image {self.rows[index]['file_name']!r} "
                          f"({type(err).__name__}: {err})", stacklevel=3)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.rows)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        index %= n
        for step in range(n):
            i = (index + step) % n
            if i in self._bad:
                continue
            try:
                return self._load(i)
            except Exception as err:  # corrupt, truncated, missing, not an image: skip, count, go on
                self._mark_bad(i, err, warn=True)
        raise InvalidInput(f"{self.root}: no readable image among {n} samples")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Each good sample once, in order (bad ones skipped and counted, not replaced)."""
        for i in range(len(self.rows)):
            if i in self._bad:
                continue
            try:
                yield self._load(i)
            except Exception as err:
                self._mark_bad(i, err, warn=False)

    def batch(self, positions: Sequence[int] | torch.Tensor) -> dict[str, Any]:
        """The items at `positions` (bad ones replaced, as `__getitem__`), collated by `collate_items`."""
        return collate_items([self[int(p)] for p in positions])

    def batches(self, batch_size: int) -> Iterator[dict[str, Any]]:
        """Every good item once, in order, in collated batches of `batch_size` (bad images skipped)."""
        pending: list[dict[str, Any]] = []
        for item in self:
            pending.append(item)
            if len(pending) == batch_size:
                yield collate_items(pending)
                pending = []
        if pending:
            yield collate_items(pending)


def collate_items(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Reader items as one batch: images stacked (tensors), texts/keys/meta as lists, indices as int64."""
    return {"image": torch.stack([it["image"] for it in items]), "text": [it["text"] for it in items],
            "key": [it["key"] for it in items], "index": torch.tensor([it["index"] for it in items], dtype=torch.int64),
            "meta": [it["meta"] for it in items]}


# --------------------------------------------------------------------------------------------------
# brace expansion (braceexpand-compatible for the patterns shard lists use)

_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """`a-{000..003}.tar` -> a-000.tar .. a-003.tar (zero padding kept); `{a,b}` lists; nested and several
    groups work (innermost first). A `{` with no matching `}` is left as is."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    rng = re.fullmatch(r"(-?\d+)\.\.(-?\d+)(?:\.\.(\d+))?", body)
    if rng:
        a, b = int(rng.group(1)), int(rng.group(2))
        step = int(rng.group(3) or 1) or 1
        width = max(len(rng.group(1)), len(rng.group(2))) if (rng.group(1).startswith("0") or
                                                              rng.group(2).startswith("0")) else 0
        values = range(a, b + 1, step) if a <= b else range(a, b - 1, -step)
        items = [str(v).zfill(width) if width else str(v) for v in values]
    elif "," in body:
        items = body.split(",")
    else:  # "{x}" is not a brace group: keep it literally, expand what follows
        head, tail = pattern[:m.end()], pattern[m.end():]
        return [head + rest for rest in expand_braces(tail)]
    out: list[str] = []
    for item in items:
        out.extend(expand_braces(pattern[:m.start()] + item + pattern[m.end():]))
    return out


def expand_urls(urls: str | Path | Sequence[str | Path]) -> list[str]:
    """A pattern, a `::`-separated string of patterns (webdataset's convention), or a list of them."""
    if isinstance(urls, (str, Path)):
        parts = str(urls).split("::")
    else:
        parts = [str(u) for u in urls]
    out: list[str] = []
    for part in parts:
        out.extend(expand_braces(part))
    if not out:
        raise InvalidInput("no shard urls given")
    return out


# --------------------------------------------------------------------------------------------------
# WebDataset shards


def _tar_samples(url: str, on_error: Callable[[str], None]) -> Iterator[dict[str, Any]]:
    """Raw samples (key -> bytes per extension) of one shard, via webdataset's tar iterators.

    A damaged shard ends early (what was read before the damage is kept) and is reported, not raised.
    """
    from webdataset.gopen import gopen
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    def files(stream) -> Iterator[dict[str, Any]]:
        for item in tar_file_iterator(stream):
            item["__url__"] = url
            yield item

    try:
        stream = gopen(url, "rb")
    except Exception as err:
        on_error(f"cannot open shard {url} ({type(err).__name__}: {err})")
        return
    try:
        yield from group_by_keys(files(stream))
    except Exception as err:
        on_error(f"shard {url} is damaged, rest skipped ({type(err).__name__}: {err})")
    finally:
        stream.close()


def sample_caption(raw: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(caption, json metadata) of a raw shard sample: its .txt, else the json's 'caption' or 'text'."""
    meta: dict[str, Any] = {}
    if "json" in raw:
        meta = json.loads(raw["json"])
        if not isinstance(meta, dict):
            meta = {"json": meta}
    text = raw["txt"].decode("utf-8").strip() if "txt" in raw else meta.get("caption", meta.get("text"))
    if not isinstance(text, str):
        raise ValueError(f"sample {raw['__key__']} has no caption (.txt, or json 'caption'/'text')")
    return text, meta


def webdataset_captions(urls: str | Path | Sequence[str | Path], limit: int | None = None) -> Iterator[str]:
    """The captions of shards in order, up to `limit`, without decoding any image (samples with no caption,
    and damaged shards, are passed over): what a tokenizer of this data learns from."""
    count = 0
    for url in expand_urls(urls):
        for raw in _tar_samples(url, on_error=lambda message: None):
            try:
                text = sample_caption(raw)[0]
            except (ValueError, UnicodeDecodeError):
                continue
            if text:
                yield text
                count += 1
                if limit is not None and count >= limit:
                    return


def _seeded_rng(*parts: Any) -> random.Random:
    # str seeds are hashed with sha512 by `random`: stable across runs and machines (unlike hash())
    return random.Random("-".join(str(p) for p in parts))


def _shuffle_buffer(items: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Classic reservoir-style buffer shuffle; deterministic for a given rng and input order."""
    if size <= 1:
        yield from items
        return
    buf: list[Any] = []
    for item in items:
        buf.append(item)
        if len(buf) >= size:
            j = rng.randrange(len(buf))
            buf[j], buf[-1] = buf[-1], buf[j]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


class ShardPlan:
    """Which shards, and which of their samples, each consumer (process x DataLoader worker) reads in an epoch,
    and in which order: the shard list permuted with (seed, epoch), split whole between consumers where there
    are enough shards (else every consumer strides samples), then a shuffle buffer of raw samples seeded per
    consumer. Same arguments -> same streams."""

    def __init__(self, urls: list[str], shuffle_buffer: int, seed: int, rank: int, world_size: int) -> None:
        self.urls, self.shuffle_buffer, self.seed, self.rank, self.world_size = urls, shuffle_buffer, seed, rank, world_size

    def shard_order(self, epoch: int) -> list[str]:
        order = list(self.urls)
        _seeded_rng("shards", self.seed, epoch).shuffle(order)
        return order

    def consumer_plan(self, epoch: int, worker: int, num_workers: int) -> tuple[list[str], int, int]:
        """(shards, stride, offset) of one consumer: read `shards`, keep raw samples i with i % stride ==
        offset."""
        shards = self.shard_order(epoch)
        ws, r = self.world_size, self.rank
        if len(shards) >= ws:
            shards = shards[r::ws]
            if len(shards) >= num_workers:
                return shards[worker::num_workers], 1, 0
            return shards, num_workers, worker
        # fewer shards than ranks: stride samples over all consumers
        return shards, ws * num_workers, r * num_workers + worker

    def raw_stream(self, epoch: int, worker: int, num_workers: int,
                   on_error: Callable[[str], None]) -> Iterator[dict[str, Any]]:
        """One consumer's raw (undecoded) samples of `epoch`, through its shuffle buffer."""
        shards, stride, offset = self.consumer_plan(epoch, worker, num_workers)

        def raw() -> Iterator[dict[str, Any]]:
            i = 0
            for url in shards:
                for sample in _tar_samples(url, on_error):
                    if i % stride == offset:
                        yield sample
                    i += 1

        rng = _seeded_rng("buffer", self.seed, epoch, self.rank, self.world_size, worker, num_workers)
        return _shuffle_buffer(raw(), self.shuffle_buffer, rng)


class WebDatasetReader(IterableDataset):
    """Streams img2dataset-style shards: `KEY.jpg|png|webp` + `KEY.txt` and/or `KEY.json` per sample.

    One `iter()` is one epoch. The caption is KEY.txt (stripped), else json "caption", else json "text";
    json goes to `meta`. Samples with no image, no caption or an undecodable image are skipped and counted.

    Sharding. There are world_size * num_workers consumers (num_workers = DataLoader workers, 0 and 1
    give the same stream). Each epoch the shard list is permuted with (seed, epoch); rank r takes every
    world_size-th shard of it, and worker w of that rank every num_workers-th of those, so each shard is
    read by exactly one consumer per epoch. Fallback: when a level has fewer shards than consumers, that
    level strides SAMPLES instead (every consumer reads the same shards and keeps every n-th sample), so
    the split stays disjoint and complete but I/O is repeated. Shards are split whole, so ranks may get
    different sample counts: for DDP use shards of equal size, a shard count divisible by world_size,
    or a fixed number of steps per epoch.

    Shuffling: shard order (seed, epoch) and a per-consumer shuffle buffer of raw (undecoded) samples
    seeded with (seed, epoch, rank, world_size, worker, num_workers). Same arguments -> same stream.

    Resuming. `state_dict()` -> {"epoch", "consumed", "positions", "next_worker", "num_workers"}:
    `consumed` counts the samples delivered this epoch, `positions[w]` how many shuffle-buffer outputs
    consumer w has used (decode failures included), `next_worker` which worker the DataLoader's
    round-robin serves next. A reader given that state via `load_state_dict` fast-forwards each consumer
    by re-reading its shards through the same shuffle buffer WITHOUT decoding (tar I/O only), and maps
    DataLoader workers onto consumers rotated by `next_worker`, so it yields exactly the samples the
    uninterrupted reader would have yielded next, also when some workers ran out before others. Resume
    with the same num_workers (and batch_size) as the state was saved with. A state holding only
    {"epoch", "consumed"} is accepted too and assumes balanced workers and no decode failures.

    Tracking happens where samples are delivered: iterating the reader in this process (num_workers=0)
    updates it directly; with DataLoader workers use `reader.loader(...)` (it tags each batch with its
    worker and position; a plain DataLoader gives the same stream but cannot update the state). Do not
    use persistent_workers: each epoch's workers must get the current epoch and positions.
    """

    def __init__(self, urls: str | Path | Sequence[str | Path], shuffle_buffer: int = 1000, seed: int = 0,
                 rank: int = 0, world_size: int = 1, size: int | None = None,
                 transform: Transform | None = None) -> None:
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.urls = expand_urls(urls)
        self.shuffle_buffer = int(shuffle_buffer)
        self.seed = int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.plan = ShardPlan(self.urls, self.shuffle_buffer, self.seed, self.rank, self.world_size)
        self.transform = _pick_transform(size, transform)
        self.skipped = 0  # undecodable / incomplete samples delivered-side (see class docstring)
        self.errors: list[str] = []  # damaged or unreadable shards
        self.epoch = 0
        self.consumed = 0
        self._positions: list[int] | None = None  # per logical worker, None: epoch start
        self._next_worker = 0
        self._num_workers: int | None = None  # logical worker count the positions refer to

    # -- the deterministic per-consumer stream ------------------------------------------------------

    def consumer_plan(self, epoch: int, worker: int, num_workers: int) -> tuple[list[str], int, int]:
        return self.plan.consumer_plan(epoch, worker, num_workers)

    def _raw_stream(self, epoch: int, worker: int, num_workers: int) -> Iterator[dict[str, Any]]:
        return self.plan.raw_stream(epoch, worker, num_workers, self._shard_error)

    def _shard_error(self, message: str) -> None:
        self.errors.append(message)
        warnings.warn(message, stacklevel=2)

    def _decode(self, raw: dict[str, Any]) -> dict[str, Any]:
        key = raw["__key__"]
        ext = next((e for e in IMAGE_EXTS if e in raw), None)
        if ext is None:
            raise ValueError(f"sample {key} has no image ({', '.join(IMAGE_EXTS)})")
        text, meta = sample_caption(raw)
        image = decode_image(raw[ext])
        if self.transform is not None:
            image = self.transform(image)
        return {"image": image, "text": text, "key": key, "meta": meta}

    # -- iteration ---------------------------------------------------------------------------------

    def _start_positions(self, num_workers: int) -> tuple[list[int], int]:
        if self._positions is None:
            if self.consumed == 0:
                return [0] * num_workers, 0
            # {"epoch", "consumed"} only: balanced round-robin, no decode failures assumed
            n = self.consumed
            return [n // num_workers + (1 if w < n % num_workers else 0) for w in range(num_workers)], \
                n % num_workers
        if self._num_workers != num_workers:
            raise InvalidInput(f"this reader's state was saved with num_workers={self._num_workers}; resume with "
                             f"the same number of DataLoader workers (got {num_workers})")
        return list(self._positions), self._next_worker

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        num_workers = info.num_workers if info is not None else 1
        physical = info.id if info is not None else 0
        positions, rotation = self._start_positions(num_workers)
        worker = (physical + rotation) % num_workers  # logical consumer this process plays
        start = positions[worker]
        epoch = self.epoch
        in_worker = info is not None
        if not in_worker:
            self._positions, self._next_worker, self._num_workers = positions, rotation, num_workers
        pos = 0
        new_skips = 0
        for raw in self._raw_stream(epoch, worker, num_workers):
            pos += 1
            if pos <= start:
                continue  # fast-forward: no decode
            try:
                sample = self._decode(raw)
            except Exception as err:
                new_skips += 1
                if not in_worker:
                    self.skipped += 1
                warnings.warn(f"skipping sample {raw.get('__key__')!r} of {raw.get('__url__')} "
                              f"({type(err).__name__}: {err})", stacklevel=2)
                continue
            if in_worker:
                sample["_pos"] = (worker, pos, new_skips)  # read by `loader()` in the main process
            else:
                self.consumed += 1
                self._positions[worker] = pos  # type: ignore[index]
            new_skips = 0
            yield sample
        if not in_worker:
            self._end_epoch(epoch)

    def _end_epoch(self, epoch: int) -> None:
        if self.epoch == epoch:
            self.epoch = epoch + 1
            self.consumed = 0
            self._positions, self._next_worker, self._num_workers = None, 0, None

    def _advance(self, worker: int, pos: int, count: int, new_skips: int, num_workers: int) -> None:
        """Main-process bookkeeping for one batch delivered by a DataLoader worker."""
        if self._positions is None or self._num_workers != num_workers:
            self._positions, _ = self._start_positions(num_workers)
            self._num_workers = num_workers
        self._positions[worker] = pos
        self._next_worker = (worker + 1) % num_workers
        self.consumed += count
        self.skipped += new_skips

    # -- state -------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        positions = list(self._positions) if self._positions is not None else None
        return {"epoch": self.epoch, "consumed": self.consumed, "positions": positions,
                "next_worker": self._next_worker, "num_workers": self._num_workers}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.consumed = int(state.get("consumed", 0))
        positions = state.get("positions")
        if positions is not None:
            self._positions = [int(p) for p in positions]
            self._num_workers = int(state.get("num_workers") or len(positions))
            self._next_worker = int(state.get("next_worker", 0))
        else:
            self._positions, self._next_worker, self._num_workers = None, 0, None

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning."""
        self.load_state_dict({"epoch": epoch, "consumed": 0})

    def load_resplit(self, states: list[dict[str, Any]], resplit: Resplit) -> None:
        """Continue, as this rank of this world size, from the states of all the old ranks. Shards are
        assigned whole per consumer, so a started epoch cannot be re-split exactly: it ends (the samples no
        old rank had read yet are skipped, with a warning) and the next one starts."""
        epoch = min(int(st["epoch"]) for st in states)
        read = sum(int(st.get("consumed", 0)) for st in states if int(st["epoch"]) == epoch)
        if read:
            warnings.warn(f"webdataset shards re-split over {self.world_size} processes (the checkpoint has "
                          f"{resplit.old_world_size}): epoch {epoch} ends after the {read} samples read of it; epoch "
                          f"{epoch + 1} starts", stacklevel=2)
            epoch += 1
        self.set_epoch(epoch)

    # -- DataLoader with tracking ------------------------------------------------------------------

    def loader(self, batch_size: int | None = 1, num_workers: int = 0,
               collate_fn: Callable[[list[dict[str, Any]]], Any] | None = None, **kwargs: Any) -> "ReaderLoader":
        """A DataLoader over this reader that keeps `state_dict()` exact with workers (see class doc)."""
        return ReaderLoader(self, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_fn,
                            **kwargs)


def _list_collate(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return samples


def _identity(sample: Any) -> Any:
    return sample


class _TaggedCollate:
    """Runs in the worker: strips the position tags and sends them along with the collated batch."""

    def __init__(self, collate_fn: Callable[[Any], Any], batched: bool) -> None:
        self.collate_fn = collate_fn
        self.batched = batched

    def __call__(self, samples: Any) -> tuple[tuple[int, int, int, int] | None, Any]:
        items = samples if self.batched else [samples]
        tag = None
        for s in items:
            if isinstance(s, dict) and "_pos" in s:
                worker, pos, skips = s.pop("_pos")
                tag = (worker, pos, len(items), skips + (tag[3] if tag else 0))
        return tag, self.collate_fn(samples)


class ReaderLoader:
    """Iterable of batches over a `WebDatasetReader`; one `iter()` is (the rest of) one epoch.

    Default collate returns the list of sample dicts. Updates the reader's state as batches arrive in the
    main process, so `reader.state_dict()` after handling a batch resumes right after it.
    """

    def __init__(self, reader: WebDatasetReader, batch_size: int | None = 1, num_workers: int = 0,
                 collate_fn: Callable[[Any], Any] | None = None, **kwargs: Any) -> None:
        if kwargs.get("persistent_workers"):
            raise ValueError("persistent_workers would keep a stale epoch/position in the workers; leave it off")
        self.reader = reader
        self.num_workers = num_workers
        self.batched = batch_size is not None
        collate = collate_fn or (_list_collate if self.batched else _identity)
        self.loader = DataLoader(reader, batch_size=batch_size, num_workers=num_workers,
                                 collate_fn=_TaggedCollate(collate, self.batched) if num_workers > 0 else collate,
                                 **kwargs)

    def __iter__(self) -> Iterator[Any]:
        if self.num_workers == 0:
            yield from self.loader  # the reader tracks itself in this process
            return
        self.reader._start_positions(self.num_workers)  # a state of another worker count: refused before any starts
        epoch = self.reader.epoch
        for tag, batch in self.loader:
            if tag is not None:
                worker, pos, count, skips = tag
                self.reader._advance(worker, pos, count, skips, self.num_workers)
            yield batch
        self.reader._end_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        return self.reader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reader.load_state_dict(state)
