"""VAE reconstruction benchmark under a wall-clock budget.

Trains a config on the `train` split of an image folder for at most --minutes (the cosine LR schedule
decays over the wall-clock budget, which is also a hard stop), then reports held-out PSNR on the whole `val` split, training time and steps, and the
end-to-end encode throughput of `encode_folder` (PNG decode + encoder + shard writes). The last line of
output is one JSON object.

    python benchmarks/vae_recon.py --data /tmp/shapes32 --config configs/vae/tiny-32.yaml --minutes 10
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transfusion_mot.data.readers import ImageFolderReader  # noqa: E402
from vae.autoencoder import load_vae  # noqa: E402
from vae.latents import encode_folder  # noqa: E402
from vae.reconstruct import evaluate_psnr, reconstruct  # noqa: E402
from vae.train import resolve_config, train_vae  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="image folder with train and val splits")
    p.add_argument("--config", default="configs/vae/tiny-32.yaml")
    p.add_argument("--minutes", type=float, default=10.0, help="training wall-clock budget")
    p.add_argument("--out", default=None, help="output directory (default: /tmp/vae_recon/<data name>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--max-steps", type=int, default=None, help="fixed step count (cosine over steps) instead of the time-based schedule")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = resolve_config(args.config, args.set)
    out = Path(args.out or f"/tmp/vae_recon/{Path(args.data).name}")
    budget = args.minutes * 60
    train_set = ImageFolderReader(args.data, split="train", size=cfg.model.sample_size)
    val_set = ImageFolderReader(args.data, split="val", size=cfg.model.sample_size)

    # the cosine schedule decays over the wall-clock budget (schedule_by_time); max_steps only caps it
    max_steps = args.max_steps or 1_000_000
    print(f"config {args.config}: {len(train_set)} train / {len(val_set)} val images; budget {budget:.0f} s",
          flush=True)

    summary = train_vae(cfg, args.data, out, max_steps=max_steps, time_budget_s=budget,
                        schedule_by_time=args.max_steps is None, progress=not args.no_progress)
    vae = load_vae(out)
    t0 = time.perf_counter()
    val_psnr = evaluate_psnr(vae, val_set)
    eval_s = time.perf_counter() - t0
    grid = reconstruct(vae, args.data, out / "recon_val.png", n=32, split="val")

    t0 = time.perf_counter()
    index = encode_folder(out, args.data, out / "latents", batch_size=64, progress=False)
    encode_s = time.perf_counter() - t0

    result = {
        "benchmark": "vae_recon", "data": str(args.data), "config": str(args.config),
        "params": summary["params"], "budget_min": args.minutes,
        "steps": summary["steps"], "stopped_early": summary["stopped_early"],
        "train_time_s": summary["train_time_s"], "train_images": summary["train_images"],
        "final_train_psnr": summary["final"].get("psnr"), "val_images": len(val_set),
        "val_psnr_db": round(val_psnr, 3), "grid_psnr_db": round(grid["psnr"], 3),
        "eval_images_per_s": round(len(val_set) / eval_s, 1),
        "encode_images": index["count"], "encode_s": round(encode_s, 2),
        "encode_images_per_s": round(index["count"] / encode_s, 1),
        "latent_shape": index["latent_shape"], "scaling_factor": round(index["scaling_factor"], 5),
        "shift_factor": round(index["shift_factor"], 5), "threads": torch.get_num_threads(), "out": str(out),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
