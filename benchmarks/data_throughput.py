"""Data set writers: images per second for shapes, folder import and emoji (CPU, including PNG writes).

Shapes must stay above 1,000 images/s at 32 px on a 2-core machine (procedural data should never be
the bottleneck of a CPU run). The folder import runs on generated photo-like JPEGs (noise plus
shapes, `--folder-side` px), single process and with `--workers` processes. Emoji renders the whole
Noto Color Emoji set (skipped if the font is absent). Prints a table, then one JSON object as the last
line.

    python benchmarks/data_throughput.py [--size 32 --shapes-num 3000 --folder-num 200 --folder-side 512 --workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from transfusion_mot.data.emoji import DEFAULT_FONT, generate_emoji
from transfusion_mot.data.folder import import_folder
from transfusion_mot.data.shapes import generate_shapes


def make_jpegs(src: Path, num: int, side: int) -> None:
    """Photo-like inputs: smooth gradients, noise and shapes, saved as JPEG with sidecar captions."""
    src.mkdir(parents=True)
    shapes_dir = src.parent / "shape_tiles"
    generate_shapes(shapes_dir, num, size=64, seed=7)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side * 4 // 3].astype(np.float32) / side
    for i in range(num):
        tile = np.asarray(Image.open(shapes_dir / f"images/{i:06d}.png").resize((side * 4 // 3, side)), np.float32)
        grad = np.stack([xx, yy, 1 - xx], -1) * 80
        img = np.clip(tile * 0.7 + grad + rng.normal(0, 12, tile.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(src / f"img{i:05d}.jpg", quality=90)
        (src / f"img{i:05d}.txt").write_text(f"photo number {i}\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=32, help="output image side")
    ap.add_argument("--shapes-num", type=int, default=3000)
    ap.add_argument("--folder-num", type=int, default=200)
    ap.add_argument("--folder-side", type=int, default=512, help="height of the generated 4:3 input JPEGs")
    ap.add_argument("--workers", type=int, default=2, help="processes for the second folder-import run")
    ap.add_argument("--emoji-limit", type=int, default=None, help="stop after this many emoji (default: all)")
    args = ap.parse_args()

    # other processes on a small machine change these numbers a lot (file creation is most of the
    # cost at 32 px), so the load average is recorded with them
    result: dict = {"size": args.size, "cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_1m_at_start": round(os.getloadavg()[0], 2)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = os.times()
        s = generate_shapes(tmp / "shapes", args.shapes_num, size=args.size)
        t2 = os.times()
        result["shapes_images_per_s"] = s["images_per_s"]
        result["shapes_cpu_user_s"] = round(t2.user - t.user, 2)
        result["shapes_cpu_sys_s"] = round(t2.system - t.system, 2)
        rows.append(("shapes", s["count"], s["seconds"], s["images_per_s"]))

        make_jpegs(tmp / "src", args.folder_num, args.folder_side)
        for workers in sorted({1, max(1, args.workers)}):
            f = import_folder(tmp / "src", tmp / f"folder{workers}", args.size, workers=workers)
            assert f["imported"] == args.folder_num, f
            result[f"folder_images_per_s_workers{workers}"] = f["images_per_s"]
            rows.append((f"folder import {args.folder_side * 4 // 3}x{args.folder_side} jpg, {workers} proc",
                         f["imported"], f["seconds"], f["images_per_s"]))

        if Path(DEFAULT_FONT).is_file():
            e = generate_emoji(tmp / "emoji", size=args.size, limit=args.emoji_limit)
            result["emoji_images_per_s"] = e["images_per_s"]
            result["emoji_count"] = e["count"]
            rows.append(("emoji", e["count"], e["seconds"], e["images_per_s"]))
        else:
            result["emoji_images_per_s"] = None
            rows.append(("emoji (font missing)", 0, 0.0, 0.0))

    print(f"{'data set':40s} {'images':>7s} {'seconds':>8s} {'images/s':>9s}")
    for name, n, sec, ips in rows:
        print(f"{name:40s} {n:7d} {sec:8.2f} {ips:9.1f}")
    result["shapes_over_1000_per_s"] = result["shapes_images_per_s"] > 1000
    print(json.dumps(result))


if __name__ == "__main__":
    main()
