"""Sampling speed: KV-cached versus uncached text -> image, at 32 and 64 px, VAE decode included.

The tiny model (configs/model/tiny.yaml) and the tiny VAEs (configs/vae/tiny-*.yaml) with random weights:
speed does not depend on the weights. Each setting generates --images images from a realistic caption
with --steps denoising steps and classifier-free guidance --cfg (cond and uncond rows batched together),
once with the KV cache (the caption's keys/values computed once, each step runs only the image tokens) and
once without (the whole sequence at every step); the two are timed interleaved (cached, uncached, cached,
...) so machine noise hits both alike, and the medians are reported. The cached and uncached latents are
also compared (max abs difference). Captioning (image -> text, greedy) is timed the same way.

Settings (latent shape from each VAE config): 32 px with tiny-32 (factor 4: 8x8x4 latent, 16 image tokens),
64 px with tiny-64 (factor 8: 8x8x4, 16 tokens), and 64 px with the factor-4 tiny-32 architecture at
sample_size 64 (16x16x4 latent, 64 tokens), which shows how the gain shrinks as images get longer than
the caption. The last line of output is one JSON object.

    python benchmarks/sampling.py [--steps 25 --cfg 3 --images 8 --repeats 5 --threads 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transfusion_mot.config import ModelConfig
from transfusion_mot.inference.sampling import caption_images, generate_latents
from transfusion_mot.model import TransfusionMoT
from transfusion_mot.tokenizer import ByteTokenizer
from vae.autoencoder import build_vae, decode, load_vae_config

CAPTION = "a small red circle above a large blue square"
SETTINGS = {  # name: (pixels, VAE config, overrides)
    "32px": (32, "configs/vae/tiny-32.yaml", []),
    "64px": (64, "configs/vae/tiny-64.yaml", []),
    "64px-f4": (64, "configs/vae/tiny-32.yaml", ["model.sample_size=64"]),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "configs/model/tiny.yaml"))
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--scheduler", default="ddpm")
    ap.add_argument("--images", type=int, default=8, help="images per run (one batch)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--caption-tokens", type=int, default=32, help="max_new_tokens for the captioning timing")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = TransfusionMoT(ModelConfig.from_yaml(args.model)).eval()
    with torch.no_grad():  # the default init zeroes the image head; any non-zero head will do for timing
        model.image_head.weight.normal_(std=0.02)
    tokenizer = ByteTokenizer()
    prompts = [CAPTION] * args.images
    results = {}
    for name in args.settings:
        pixels, vae_config, overrides = SETTINGS[name]
        vae_cfg = load_vae_config(ROOT / vae_config, overrides)
        vae = build_vae(vae_cfg).eval()
        side = vae_cfg.model.latent_size
        shape = (vae_cfg.model.latent_channels, side, side)
        kw = {"latent_shape": shape, "scheduler": args.scheduler, "num_steps": args.steps, "cfg_scale": args.cfg,
              "seed": 0, "batch_size": args.images}
        generate_latents(model, tokenizer, prompts[:2], **{**kw, "num_steps": 2})  # warm-up
        times: dict[str, list[float]] = {"cached": [], "uncached": [], "decode": [], "caption_cached": [],
                                          "caption_uncached": []}
        latents: dict[str, torch.Tensor] = {}
        for _ in range(args.repeats):
            for key, use_cache in (("cached", True), ("uncached", False)):
                start = time.perf_counter()
                latents[key] = generate_latents(model, tokenizer, prompts, use_kv_cache=use_cache, **kw)
                times[key].append(time.perf_counter() - start)
            start = time.perf_counter()
            with torch.no_grad():
                images = decode(vae, latents["cached"])
            times["decode"].append(time.perf_counter() - start)
            for key, use_cache in (("caption_cached", True), ("caption_uncached", False)):
                start = time.perf_counter()
                caption_images(model, tokenizer, latents["cached"], max_new_tokens=args.caption_tokens,
                               use_kv_cache=use_cache)
                times[key].append(time.perf_counter() - start)
        med = {k: statistics.median(v) for k, v in times.items()}
        n = args.images
        tokens = len(tokenizer.encode(CAPTION)) + (side // 2) ** 2 + 4
        results[name] = {
            "pixels": pixels, "vae": vae_config + (f" {' '.join(overrides)}" if overrides else ""),
            "latent": list(shape), "image_tokens": (side // 2) ** 2, "sequence_tokens": tokens,
            "cached_s": round(med["cached"], 3), "uncached_s": round(med["uncached"], 3),
            "speedup": round(med["uncached"] / med["cached"], 2),
            "images_per_s_cached": round(n / med["cached"], 2),
            "images_per_s_uncached": round(n / med["uncached"], 2),
            "vae_decode_s": round(med["decode"], 3),
            "images_per_s_end_to_end_cached": round(n / (med["cached"] + med["decode"]), 2),
            "images_per_s_end_to_end_uncached": round(n / (med["uncached"] + med["decode"]), 2),
            "max_abs_diff_cached_vs_uncached": float((latents["cached"] - latents["uncached"]).abs().max()),
            "max_abs_latent": float(latents["uncached"].abs().max()),
            "caption_speedup": round(med["caption_uncached"] / med["caption_cached"], 2),
            "caption_cached_s": round(med["caption_cached"], 3),
            "image_shape": list(images.shape[1:]),
        }
        print(f"{name}: latent {tuple(shape)}, {n} images x {args.steps} steps, cfg {args.cfg}: "
              f"cached {med['cached']:.2f}s, uncached {med['uncached']:.2f}s "
              f"({results[name]['speedup']}x), VAE decode {med['decode']:.3f}s, end to end "
              f"{results[name]['images_per_s_end_to_end_cached']} img/s cached vs "
              f"{results[name]['images_per_s_end_to_end_uncached']} uncached; captions "
              f"{results[name]['caption_speedup']}x", flush=True)
    print(json.dumps({
        "benchmark": "sampling", "model": Path(args.model).name, "params": sum(p.numel() for p in model.parameters()),
        "caption": CAPTION, "steps": args.steps, "cfg": args.cfg, "scheduler": args.scheduler,
        "images": args.images, "repeats": args.repeats, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(), "results": results,
    }))


if __name__ == "__main__":
    main()
