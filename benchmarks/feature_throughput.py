"""Feature extraction speed of the evaluation networks, side by side in one process: images/s of the
Inception (FID, KID), DINOv2 ViT-L/14 (FD-DINOv2, precision/recall) and their ratio, on the same images.

Why: `tmot eval bench` runs one pass per feature space and side, so these numbers say what a benchmark of
n images costs. The DINOv2 network is timm's vit_large_patch14_dinov2 architecture; without
`--dinov2-model`, with random weights saved locally (the speed of a network does not depend on its
weights; nothing is downloaded).

    python benchmarks/feature_throughput.py --n 64
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.features import extract_features
from eval.fid import load_feature_extractor
from transfusion_mot.data.shapes import generate_shapes


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def random_dinov2(directory: Path) -> str:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_large_patch14_dinov2", pretrained=False, num_classes=0)
    timm.models.save_for_hf(model, str(directory), safe_serialization=True)
    return f"local-dir:{directory}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=64, help="images per network")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dinov2-model", default=None, help="timm name, hf-hub:ID or local-dir:PATH (default: random "
                                                        "weights of the ViT-L/14 architecture)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        generate_shapes(Path(tmp) / "shapes", args.n, seed=0)
        images = sorted((Path(tmp) / "shapes").rglob("*.png"))[: args.n]
        from PIL import Image

        arrays = [Image.open(p).convert("RGB") for p in images]
        model = args.dinov2_model or random_dinov2(Path(tmp) / "dinov2")
        results = {}
        for space, name in (("inception", None), ("dinov2", model)):
            t0 = time.perf_counter()
            extractor = load_feature_extractor(space, name, args.device)
            load_s = time.perf_counter() - t0
            extract_features(arrays[: args.batch_size // 4 or 1], extractor, args.batch_size, args.device)  # warm-up
            t0 = time.perf_counter()
            feats = extract_features(arrays, extractor, args.batch_size, args.device)
            seconds = time.perf_counter() - t0
            results[space] = {"images_per_s": round(len(arrays) / seconds, 2), "load_s": round(load_s, 1),
                              "feature_dim": int(feats.shape[1]), "network": extractor.identity["extractor"]}
            print(f"{space:9s} {results[space]['images_per_s']:7.2f} images/s  (load {load_s:.1f} s, "
                  f"{feats.shape[1]}-d, {extractor.preprocessing})", flush=True)
    ratio = results["inception"]["images_per_s"] / results["dinov2"]["images_per_s"]
    print(f"dinov2 takes {ratio:.2f}x Inception's time per image", flush=True)
    print(json.dumps({"n": args.n, "threads": torch.get_num_threads(), "cpu": cpu_name(), "device": args.device,
                      "results": results, "dinov2_over_inception_time": round(ratio, 2)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
