"""GPU training throughput and MFU, and 256 px sampling speed, side by side in one process.

Training: for each model size (`configs/model/163m.yaml`, `760m.yaml`), MoT and dense, compile on/off and
FlexAttention vs SDPA, one bf16 training step (forward, backward, AdamW) on packed rows of 4,096 tokens of
synthetic samples shaped like the coco-760m recipe (`benchmarks/packing.py`: captions of 5-60 tokens, 32x32x4
latents -> 256 image tokens, 20% image-first). The variants run one after another (one model in memory at a time: the 760m MoT
with AdamW state alone is ~22 GB), each warmed up before its timed steps (median reported). Reports tokens/s (real tokens), MFU (`accounting.batch_train_flops` over the device's dense bf16
peak, `transfusion_mot.common.throughput`) and peak memory, plus the MoT/dense step-time and flex/SDPA
ratios. Sampling: the 760m MoT (4 latent channels), 32x32x4 latents, CFG 3, 250 and 50 steps, images/s with
and without the KV cache. The last line is one JSON object.

    python benchmarks/gpu_training.py                          # everything (an H100: several minutes)
    python benchmarks/gpu_training.py --models 163m --no-sampling
    python benchmarks/gpu_training.py --smoke                  # a tiny model on the CPU: checks the script
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import time
import zlib
from pathlib import Path

import torch
from packing import SyntheticSamples  # benchmarks/packing.py, beside this script

from transfusion_mot.accounting import batch_train_flops, parameter_accounting
from transfusion_mot.batch import Collator
from transfusion_mot.common.compile import compile_blocks
from transfusion_mot.common.config import from_dict, read_yaml_mapping
from transfusion_mot.common.throughput import mfu, peak_tflops
from transfusion_mot.config import ModelConfig
from transfusion_mot.diffusion import make_objective
from transfusion_mot.inference.sampling import generate_latents
from transfusion_mot.losses import TransfusionStep
from transfusion_mot.model import TransfusionMoT
from transfusion_mot.tokenizer import ByteTokenizer
from transfusion_mot.training.stream import PackedBatches

REPO = Path(__file__).resolve().parents[1]
UNTIE = {"mot": ["attn", "ffn", "norm"], "dense": []}


def model_config(name: str, untie: list[str], attn: str, smoke: bool) -> ModelConfig:
    raw = read_yaml_mapping(REPO / f"configs/model/{name}.yaml")
    raw.update(untie=untie, attn_backend=attn, latent_channels=4)
    if smoke:
        raw.update(dim=64, n_layers=2, n_heads=4, ffn_dim=128, vocab_size=261, max_seq_len=512)
    return from_dict(ModelConfig, raw)


def packed_rows(cfg: ModelConfig, rows: int, budget: int, latent: int, seed: int):
    """`rows` rows of `budget` tokens packed by the trainer's own packer from coco-760m-like samples."""
    stream = SyntheticSamples(cfg, latent, seed=seed)
    return next(PackedBatches(stream, Collator(cfg, max_len=budget), rows=rows, budget=budget))


def build_variant(name: str, untie: str, compiled: bool, attn: str, args, device: torch.device):
    torch.manual_seed(0)
    cfg = model_config(name, UNTIE[untie], attn, args.smoke)
    model = TransfusionMoT(cfg).to(device)
    acc = parameter_accounting(model, seq_len=args.budget)
    step = TransfusionStep(model, make_objective(cfg))
    if compiled:
        compile_blocks(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    batch = packed_rows(cfg, args.rows, args.budget, args.latent, seed=0)
    flops = batch_train_flops(acc, batch.inputs.modality, batch.inputs.doc_ids, cfg.modalities)
    return {"model": model, "step": step, "optimizer": optimizer, "batch": batch.to(device), "flops": flops,
            "tokens": int((batch.inputs.doc_ids >= 0).sum()), "params": acc["total_params"]}


def train_step(v: dict, device: torch.device, dtype: torch.dtype | None) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        out = v["step"](v["batch"], torch.Generator().manual_seed(1))
    out["loss"].backward()
    v["optimizer"].step()
    v["optimizer"].zero_grad(set_to_none=True)
    sync()
    return time.perf_counter() - start


def training(args, device: torch.device, dtype: torch.dtype | None, peak: float | None) -> dict:
    results = {}
    for name in args.models:
        for untie, compiled, attn in itertools.product(("mot", "dense"), args.compile, args.attn):
            key = f"{name}-{untie}-{'compile' if compiled else 'eager'}-{attn}"
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            try:
                v = build_variant(name, untie, compiled, attn, args, device)
                for _ in range(args.warmup):
                    train_step(v, device, dtype)
                t = statistics.median(train_step(v, device, dtype) for _ in range(args.steps))
            except torch.OutOfMemoryError:
                results[key] = {"error": "out of memory"}
                print(f"{key}: out of memory", flush=True)
                continue
            memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
            results[key] = {"step_s": round(t, 4), "tokens_per_s": round(v["tokens"] / t),
                            "tokens_per_step": v["tokens"], "mfu": mfu(v["flops"], t, peak, 1),
                            "peak_memory_gib": round(memory, 2) if memory is not None else None,
                            "params": v["params"], "train_flops_per_step": v["flops"]}
            print(f"{key}: {t * 1000:.1f} ms/step, {results[key]['tokens_per_s']:,} tokens/s, "
                  f"MFU {results[key]['mfu']}, peak {results[key]['peak_memory_gib']} GiB", flush=True)
            del v
        for compiled, attn in itertools.product(args.compile, args.attn):
            tag = f"{'compile' if compiled else 'eager'}-{attn}"
            mot, dense = results.get(f"{name}-mot-{tag}", {}), results.get(f"{name}-dense-{tag}", {})
            if "step_s" in mot and "step_s" in dense:
                results[f"{name}-{tag}-mot_over_dense_step_time"] = round(mot["step_s"] / dense["step_s"], 3)
        for untie, compiled in itertools.product(("mot", "dense"), args.compile):
            tag = f"{name}-{untie}-{'compile' if compiled else 'eager'}"
            flex, sdpa = results.get(f"{tag}-flex", {}), results.get(f"{tag}-sdpa", {})
            if "step_s" in flex and "step_s" in sdpa:
                results[f"{tag}-sdpa_over_flex_step_time"] = round(sdpa["step_s"] / flex["step_s"], 3)
    return results


def sampling(args, device: torch.device, dtype: torch.dtype | None) -> dict:
    torch.manual_seed(0)
    cfg = model_config(args.sampling_model, UNTIE["mot"], "auto", args.smoke)
    model = TransfusionMoT(cfg).to(device).eval()
    with torch.no_grad():  # the init zeroes the image head; any non-zero head will do for timing
        model.image_head.weight.normal_(std=0.02)
    tokenizer = ByteTokenizer() if args.smoke else _WordTokenizer(cfg.vocab_size)
    prompts = ["a photograph of a red bicycle leaning against a blue wall"] * args.images
    shape = (cfg.latent_channels, args.latent, args.latent)
    results = {}
    for steps, cached in itertools.product(args.sampling_steps, (True, False)):
        kw = dict(latent_shape=shape, num_steps=steps, cfg_scale=3.0, seed=0, use_kv_cache=cached,
                  batch_size=args.images, device=device, dtype=dtype)
        generate_latents(model, tokenizer, prompts[:2], **{**kw, "num_steps": 2})  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        generate_latents(model, tokenizer, prompts, **kw)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        key = f"{steps}_steps_{'kv_cache' if cached else 'no_cache'}"
        results[key] = {"images_per_s": round(args.images / seconds, 3), "seconds": round(seconds, 2)}
        print(f"sampling {key}: {results[key]['images_per_s']} images/s", flush=True)
    for steps in args.sampling_steps:
        a, b = results[f"{steps}_steps_kv_cache"], results[f"{steps}_steps_no_cache"]
        results[f"{steps}_steps_kv_cache_speedup"] = round(a["images_per_s"] / b["images_per_s"], 2)
    return results


class _WordTokenizer:
    """Stand-in for a 32k tokenizer (timing only): one id per word."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [zlib.crc32(w.encode()) % (self.vocab_size - 5) for w in text.split()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["163m", "760m"])
    ap.add_argument("--attn", nargs="+", default=["flex", "sdpa"], choices=["flex", "sdpa"])
    ap.add_argument("--compile", nargs="+", type=lambda s: s == "on", default=[True, False],
                    help="on and/or off")
    ap.add_argument("--rows", type=int, default=2, help="packed rows per step")
    ap.add_argument("--budget", type=int, default=4096, help="tokens per row")
    ap.add_argument("--latent", type=int, default=32, help="latent side (32: 256 px through an 8x VAE)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-sampling", action="store_true")
    ap.add_argument("--sampling-model", default="760m")
    ap.add_argument("--sampling-steps", nargs="+", type=int, default=[250, 50])
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--peak-tflops", type=float, default=None, help="override the device's peak")
    ap.add_argument("--smoke", action="store_true", help="tiny model, CPU, SDPA, no compile: checks the script")
    args = ap.parse_args()
    if args.smoke:
        args.models, args.attn, args.compile = args.models[:1], ["sdpa"], [False]
        args.budget, args.latent, args.rows, args.steps, args.warmup = 256, 8, 1, 1, 1
        args.sampling_steps, args.images = [2], 2
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cpu" and not args.smoke:
        raise SystemExit("benchmarks/gpu_training.py: no CUDA device here (use --smoke to check the script on a CPU)")
    dtype = torch.bfloat16 if device.type == "cuda" else None
    torch.backends.cuda.matmul.allow_tf32 = True
    peak = peak_tflops(device, args.peak_tflops)
    report = {"benchmark": "gpu_training", "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "peak_bf16_tflops": peak, "torch": torch.__version__, "machine": platform.node(),
              "rows": args.rows, "budget": args.budget, "latent": args.latent, "steps": args.steps,
              "training": training(args, device, dtype, peak)}
    if not args.no_sampling:
        report["sampling"] = {"model": args.sampling_model, "latent": [4, args.latent, args.latent], "cfg": 3.0,
                              "images": args.images, **sampling(args, device, dtype)}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
