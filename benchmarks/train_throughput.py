"""Training throughput of the tiny configs: dense vs MoT, fp32 vs bf16, side by side in one process.

Each variant is a real `Trainer` (built by `recipes.train.build_run`: data stream, collation, forward,
backward, clipping, AdamW, EMA) on the same latent cache: 32 px shapes images encoded by a tiny VAE (8x8x4 latents -> 16 image tokens, captions
of ~40 bytes). Steps are timed interleaved (variant A, B, C, D, A, B, ...) after warm-up, so machine noise
hits all alike; tokens/s counts non-padding tokens. The last line is one JSON object.

    python benchmarks/train_throughput.py [--steps 30 --batch 32 --model configs/model/tiny.yaml]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from transfusion_mot.config import run_config_from_dict
from transfusion_mot.recipes.train import build_trainer

REPO = Path(__file__).resolve().parents[1]


def make_cache(root: Path, num: int) -> Path:
    from transfusion_mot.data.shapes import generate_shapes
    from vae import build_vae, encode_folder, load_vae_config

    generate_shapes(root / "data", num=num, size=32, seed=0, val_fraction=0.0)
    torch.manual_seed(0)
    build_vae(load_vae_config(REPO / "configs/vae/tiny-32.yaml")).save_pretrained(root / "vae")
    encode_folder(root / "vae", root / "data", root / "latents", progress=False)
    return root / "latents"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / "configs/model/tiny.yaml"))
    ap.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--images", type=int, default=512)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        latents = make_cache(tmp, args.images)
        trainers = {}
        for untie_name, untie in (("dense", []), ("mot", ["attn", "ffn", "norm"])):
            for precision in ("fp32", "bf16"):
                name = f"{untie_name}-{precision}"
                cfg = run_config_from_dict({
                    "model": args.model, "tokenizer": {"kind": "bytes"},
                    "data": {"kind": "latents", "path": str(latents)},
                    "optim": {"lr": 1e-3, "warmup_steps": 10, "ema_decay": 0.995},
                    "train": {"max_steps": 10**6, "batch_size": args.batch, "precision": precision, "device": "cpu",
                              "progress": False, "tensorboard": False}},
                    [f"model.untie={json.dumps(untie)}"])
                trainers[name] = build_trainer(cfg, tmp / name)
        times: dict[str, list[float]] = {n: [] for n in trainers}
        tokens: dict[str, list[int]] = {n: [] for n in trainers}
        for step in range(args.warmup + args.steps):
            for name, trainer in trainers.items():
                start = time.perf_counter()
                out = trainer.train_step(step)
                elapsed = time.perf_counter() - start
                if step >= args.warmup:
                    times[name].append(elapsed)
                    tokens[name].append(out.tokens)
        params = {n: sum(p.numel() for p in t.model.parameters()) for n, t in trainers.items()}

    result = {}
    print(f"{'variant':<12} {'params':>9} {'median s/step':>14} {'tokens/s':>10}")
    for name in trainers:
        med = statistics.median(times[name])
        tps = statistics.median(tokens[name]) / med
        result[name] = {"params": params[name], "median_step_s": round(med, 4), "tokens_per_s": round(tps, 1)}
        print(f"{name:<12} {params[name]:>9,} {med:>14.4f} {tps:>10,.0f}")
    ratios = {
        "mot_over_dense_fp32": round(result["mot-fp32"]["median_step_s"] / result["dense-fp32"]["median_step_s"], 3),
        "mot_over_dense_bf16": round(result["mot-bf16"]["median_step_s"] / result["dense-bf16"]["median_step_s"], 3),
        "bf16_speedup_mot": round(result["mot-fp32"]["median_step_s"] / result["mot-bf16"]["median_step_s"], 3),
        "bf16_speedup_dense": round(result["dense-fp32"]["median_step_s"] / result["dense-bf16"]["median_step_s"], 3),
    }
    print(json.dumps({"benchmark": "train_throughput", "batch": args.batch, "steps": args.steps,
                      "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
                      **ratios, "variants": result}))


if __name__ == "__main__":
    main()
