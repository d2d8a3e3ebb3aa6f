"""MoT versus dense: forward+backward time at equal active FLOPs (same width, depth and sequence).

Both models come from the same code (`untie` = {attn, ffn, norm} versus empty), run on the same batch,
timed interleaved (dense, MoT, dense, MoT, ...) so that machine noise hits both alike; `--compile` compiles
each block as train.compile does (and reports what compile did). The last line is one JSON object with
`mot_over_dense` (median MoT time / median dense time).

    python benchmarks/routing.py [--dim 256 --layers 4 --batch 4 --caption-tokens 64 --latent 32 --repeats 15 --compile]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from transfusion_mot.batch import Collator, Sample
from transfusion_mot.common.compile import compile_blocks, compile_counts
from transfusion_mot.common.device import cpu_description
from transfusion_mot.config import ModelConfig
from transfusion_mot.diffusion import make_objective
from transfusion_mot.losses import transfusion_loss
from transfusion_mot.model import TransfusionMoT


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--caption-tokens", type=int, default=64)
    ap.add_argument("--latent", type=int, default=32, help="latent side; patch 2 gives latent^2/4 image tokens (32: 256, the paper's)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--compile", action="store_true", help="compile each block (train.compile)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = dict(dim=args.dim, n_layers=args.layers, n_heads=args.heads, ffn_dim=int(8 * args.dim / 3 / 8) * 8,
                max_seq_len=4096)
    models = {name: TransfusionMoT(ModelConfig(**base, untie=untie))
              for name, untie in (("dense", []), ("mot", ["attn", "ffn", "norm"]))}
    if args.compile:
        for model in models.values():
            compile_blocks(model)
    cfg = models["dense"].config
    gen = torch.Generator().manual_seed(0)
    samples = [Sample([torch.randint(0, 256, (args.caption_tokens,), generator=gen),
                       torch.randn(cfg.latent_channels, args.latent, args.latent, generator=gen)])
               for _ in range(args.batch)]
    batch = Collator(cfg).collate_padded(samples)
    objective = make_objective(cfg)

    def step(model: TransfusionMoT) -> float:
        g = torch.Generator().manual_seed(1)
        start = time.perf_counter()
        out = transfusion_loss(model, batch, objective, g)
        out["loss"].backward()
        elapsed = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
        return elapsed

    for model in models.values():  # warm-up
        for _ in range(3):
            step(model)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            times[name].append(step(model))
    med = {name: statistics.median(t) for name, t in times.items()}
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    tokens = batch.inputs.tokens.numel()
    for name in models:
        print(f"{name:5s} params {params[name] / 1e6:6.2f}M  fwd+bwd median {med[name] * 1e3:8.2f} ms  "
              f"({tokens / med[name]:,.0f} tokens/s)")
    result = {
        "benchmark": "routing", "mot_over_dense": round(med["mot"] / med["dense"], 4),
        "dense_ms": round(med["dense"] * 1e3, 3), "mot_ms": round(med["mot"] * 1e3, 3),
        "tokens_per_batch": tokens, "seq_len": batch.inputs.tokens.shape[1], "batch": args.batch,
        "dim": args.dim, "layers": args.layers, "repeats": args.repeats,
        "compile": compile_counts() if args.compile else None, "cpu": cpu_description(), "torch": torch.__version__,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
