"""COCO-30k protocol helpers and a GenEval export.

COCO-30k (as in Transfusion and MoT): 30k captions of val2014 images, one caption per image, a
fixed seed; generated images at 256 px; reference images centre-cropped and resized to 256; FID in
clean mode. GenEval (Ghosh et al. 2023) scores images laid out as
``<outdir>/<index:05d>/metadata.jsonl`` (the prompt's metadata line) + ``samples/<k:04d>.png``.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from transfusion_mot.common.errors import InputNotFound, InvalidInput
from transfusion_mot.common.files import iter_jsonl, read_prompts, write_jsonl
from transfusion_mot.data.imageio import BadImage, center_crop_resize, load_rgb, save_images, save_png

from .images import SkipCounter

COCO_SIZE = 256


def load_coco_captions(path: str | os.PathLike) -> tuple[dict[int, str], dict[int, list[str]]]:
    """(image id -> file name, image id -> captions) from a COCO captions JSON (captions_val2014.json)."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFound(f"COCO captions file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        files = {int(im["id"]): str(im["file_name"]) for im in data["images"]}
        captions: dict[int, list[str]] = {}
        for ann in data["annotations"]:
            captions.setdefault(int(ann["image_id"]), []).append(" ".join(str(ann["caption"]).split()))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise InvalidInput(f"{path} is not a COCO captions file (needs 'images' and 'annotations'): {err}") from None
    return files, captions


def coco_prompts(captions_json: str | os.PathLike, n: int = 30_000, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` distinct images, one caption each, chosen by ``seed``: [{image_id, file_name, caption}].

    Deterministic: images are shuffled from their sorted ids, and each image's caption is drawn by
    a per-image RNG, so the list depends only on (file contents, n, seed).
    """
    files, captions = load_coco_captions(captions_json)
    ids = sorted(i for i in captions if i in files)
    if n > len(ids):
        raise InvalidInput(f"asked for {n} prompts but {captions_json} has captions for only {len(ids)} images")
    random.Random(seed).shuffle(ids)
    return [{"image_id": i, "file_name": files[i],
             "caption": random.Random(f"coco:{seed}:{i}").choice(sorted(captions[i]))} for i in ids[:n]]


def prepare_coco_reference(prompts: Sequence[dict[str, Any]], images_dir: str | os.PathLike, out_dir: str | os.PathLike,
                           size: int = COCO_SIZE) -> dict[str, Any]:
    """Centre-crop and resize (bicubic) the prompts' images to ``size`` px PNGs in ``out_dir``.

    Unreadable or missing images are skipped and counted. Existing outputs are kept (resumable).
    """
    images_dir, out_dir = Path(images_dir), Path(out_dir)
    if not images_dir.is_dir():
        raise InputNotFound(f"COCO images folder not found: {images_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    skipped = SkipCounter()
    written = 0
    for row in prompts:
        target = out_dir / f"{Path(row['file_name']).stem}.png"
        if target.is_file():
            written += 1
            continue
        try:
            image = load_rgb(images_dir / row["file_name"])
        except BadImage as err:
            skipped.add(err)
            continue
        save_png(center_crop_resize(image, size, Image.Resampling.BICUBIC), target)
        written += 1
    return {"out": str(out_dir), "images": written, "skipped": skipped.as_dict(), "size": size}


def write_prompts(prompts: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """One JSON object per line (image_id, file_name, caption)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(path, prompts)
    return path


def read_geneval_metadata(path: str | os.PathLike) -> list[dict[str, Any]]:
    """GenEval's evaluation_metadata.jsonl (one object with at least 'prompt' per line). A plain
    text file is read as one prompt per line."""
    path = Path(path)
    if path.suffix == ".txt":
        return [{"prompt": p} for p in read_prompts(path)]
    rows = []
    for lineno, row in iter_jsonl(path, "prompt metadata file"):
        if not isinstance(row.get("prompt"), str):
            raise InvalidInput(f"{path}:{lineno}: each line needs a string 'prompt'")
        rows.append(row)
    return rows


def export_geneval(generate: Callable[[list[str], int], list[Any]], metadata: Sequence[dict[str, Any]],
                   out_dir: str | os.PathLike, n_samples: int = 4, seed: int = 0) -> dict[str, Any]:
    """Generate ``n_samples`` images per prompt and write GenEval's folder layout.

    ``generate(prompts, seed)`` returns one image per prompt; prompt ``i`` uses seed ``seed + i``
    for all its samples in one batch (the prompt repeated ``n_samples`` times).
    """
    out_dir = Path(out_dir)
    for index, meta in enumerate(metadata):
        folder = out_dir / f"{index:05d}"
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        images = generate([meta["prompt"]] * n_samples, seed + index)
        if len(images) != n_samples:
            raise ValueError(f"generate returned {len(images)} images for {n_samples} prompts")
        save_images(images, folder / "samples", [{}] * len(images), name="{index:04d}.png")
        # GenEval reads this file with json.load: one object, the prompt's metadata line
        (folder / "metadata.jsonl").write_text(json.dumps(meta, ensure_ascii=False))
    return {"out": str(out_dir), "prompts": len(metadata), "samples_per_prompt": n_samples,
            "next": f"python evaluation/evaluate_images.py {out_dir} --outfile results.jsonl --model-path <DETECTOR_DIR>"}
