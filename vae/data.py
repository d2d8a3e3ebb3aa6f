"""Image folders: `DIR/metadata.jsonl` (one JSON object per line: `file_name`, `text`, optional `split` and
any other attributes) next to square RGB PNGs. The row number in metadata.jsonl is the image's stable
`index`, so latents, captions and attributes can always be joined back to the source row."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from transfusion_mot.data import imageio


class ImageFolderError(ValueError):
    """A malformed image folder: the message names the file (and line) at fault."""


def read_metadata(data_dir: str | Path) -> list[dict[str, Any]]:
    """All rows of `data_dir/metadata.jsonl`, validated by the one image-folder reader of the project."""
    try:
        return imageio.read_metadata(data_dir)
    except (ValueError, FileNotFoundError) as err:
        raise ImageFolderError(str(err)) from None


def load_image(path: str | Path, size: int | None = None) -> Tensor:
    """One PNG -> float (3, H, W) in [-1, 1]. `size` resizes (bicubic) images of another size; a file PIL
    cannot decode raises ImageFolderError naming it."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.BICUBIC)
            arr = np.asarray(im, dtype=np.uint8).copy()
    except (OSError, ValueError, SyntaxError) as err:
        raise ImageFolderError(f"{path}: cannot read image ({type(err).__name__}: {err})") from None
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


class ImageFolderDataset(Dataset):
    """Images of an image folder (optionally one split) as {"image": (3, H, W) in [-1, 1], "text", "index",
    "meta"}. `index` is the row in metadata.jsonl, not the position within the split.

    `cache=True` keeps decoded images as uint8 in RAM after first use (32 px: 3 KB each), which is what
    makes CPU training not wait on PNG decoding."""

    def __init__(self, data_dir: str | Path, split: str | None = None, size: int | None = None,
                 cache: bool = False) -> None:
        self.root = Path(data_dir)
        rows = read_metadata(self.root)
        self.split = split
        if split is not None:
            if not any("split" in r for r in rows):
                raise ImageFolderError(f"{self.root / 'metadata.jsonl'}: no row has a 'split' field, "
                                       f"cannot select split {split!r} (pass split=None for all rows)")
            selected = [i for i, r in enumerate(rows) if r.get("split") == split]
            if not selected:
                have = sorted({str(r.get("split")) for r in rows})
                raise ImageFolderError(f"{self.root / 'metadata.jsonl'}: no rows with split {split!r} "
                                       f"(splits present: {', '.join(have)})")
        else:
            selected = list(range(len(rows)))
        self.rows = rows
        self.indices = selected
        self.size = size
        self._cache: dict[int, Tensor] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.indices)

    def row(self, i: int) -> dict[str, Any]:
        return self.rows[self.indices[i]]

    def image(self, i: int) -> Tensor:
        if self._cache is not None and i in self._cache:
            return self._cache[i].float().div_(127.5).sub_(1.0)
        img = load_image(self.root / self.row(i)["file_name"], self.size)
        if self._cache is not None:
            self._cache[i] = ((img + 1) * 127.5).round().to(torch.uint8)
        return img

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i = i % len(self)
        row = self.row(i)
        return {"image": self.image(i), "text": row["text"], "index": self.indices[i], "meta": row}

    def batch(self, positions: list[int] | Tensor) -> dict[str, Any]:
        """Items at `positions` collated: images stacked, texts/meta as lists, indices as int64."""
        return collate_images([self[int(p)] for p in positions])


def collate_images(items: list[dict[str, Any]]) -> dict[str, Any]:
    """DataLoader collate_fn for ImageFolderDataset (metadata rows differ in keys, so no default_collate)."""
    return {"image": torch.stack([it["image"] for it in items]),
            "text": [it["text"] for it in items],
            "index": torch.tensor([it["index"] for it in items], dtype=torch.int64),
            "meta": [it["meta"] for it in items]}
