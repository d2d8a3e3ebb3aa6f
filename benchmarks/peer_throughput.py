"""Training throughput against a peer: our MoT and dense model versus lucidrains' transfusion-pytorch, one process.

The same shape for all (width 128, depth 4, 4 heads of 32; a batch of 32 samples, each 40 random text tokens
then one image of 16 tokens: for us an 8x8x4 latent in 2x2 patches, for the peer a 4x4 grid of 16-d latents),
a full training step each (forward, loss, backward, fused AdamW), timed interleaved (each round in the next order of the three)
after warm-up, so that machine noise hits all alike. Ours runs as the trainer runs it (the loss module,
eager; `--compile` compiles each block as train.compile does). Tokens are the 56 text and image tokens of
each sample.
The last line is one JSON object with the ratios.

Needs the peer: pip install -e ".[peer]" (transfusion-pytorch==0.20.0)

    python benchmarks/peer_throughput.py [--batch 32 --steps 30 --compile]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import torch

from transfusion_mot.batch import Batch, Collator, Sample
from transfusion_mot.common.compile import compile_blocks, compile_counts
from transfusion_mot.common.device import cpu_description
from transfusion_mot.config import ModelConfig
from transfusion_mot.diffusion import make_objective
from transfusion_mot.losses import TransfusionStep
from transfusion_mot.model import TransfusionMoT

TEXT_TOKENS, LATENT = 40, (4, 8, 8)  # 8x8x4 latent, 2x2 patches: 16 image tokens of 16 values


def our_model(untie: list[str], seed: int) -> TransfusionMoT:
    """Our model at the benchmark's shape: MoT (untie everything) or dense (untie nothing)."""
    torch.manual_seed(seed)
    config = ModelConfig(dim=128, n_layers=4, n_heads=4, ffn_dim=344, vocab_size=261, latent_channels=4, patch_size=2,
                         max_seq_len=128, untie=untie, qk_norm=True, objective="flow")
    return TransfusionMoT(config)


def our_batch(config: ModelConfig, batch_size: int, seed: int) -> Batch:
    """One fixed collated batch: each sample 40 random text tokens, then an 8x8x4 latent."""
    gen = torch.Generator().manual_seed(seed)
    samples = [Sample([torch.randint(0, 256, (TEXT_TOKENS,), generator=gen), torch.randn(*LATENT, generator=gen)])
               for _ in range(batch_size)]
    return Collator(config).collate_padded(samples)


def ours(untie: list[str], batch_size: int, compiled: bool, seed: int):
    """A step function of our model (MoT or dense) on one fixed collated batch."""
    model = our_model(untie, seed)
    if compiled:
        compile_blocks(model)
    module = TransfusionStep(model, make_objective(model.config))
    batch = our_batch(model.config, batch_size, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    noise = torch.Generator().manual_seed(seed + 1)

    def step() -> None:
        module(batch, noise)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step


def peer(batch_size: int, seed: int):
    """The same step of transfusion-pytorch 0.20.0 (flow matching, its own loss), 16 image tokens per sample."""
    from transfusion_pytorch import Transfusion

    torch.manual_seed(seed)
    model = Transfusion(num_text_tokens=256, dim_latent=16, modality_default_shape=(4, 4),
                        transformer=dict(dim=128, depth=4, dim_head=32, heads=4))
    gen = torch.Generator().manual_seed(seed)
    data = [[torch.randint(0, 256, (TEXT_TOKENS,), generator=gen), torch.randn(4, 4, 16, generator=gen)]
            for _ in range(batch_size)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)

    def step() -> None:
        model(data).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="compile our models' blocks (train.compile)")
    ap.add_argument("--no-peer", action="store_true", help="ours only (MoT and dense)")
    args = ap.parse_args()
    variants = {"mot": ours(["attn", "ffn", "norm"], args.batch, args.compile, 0),
                "dense": ours([], args.batch, args.compile, 0)}
    if not args.no_peer:
        try:
            variants["transfusion-pytorch"] = peer(args.batch, 0)
        except ImportError:
            raise SystemExit('error: the peer is not installed: pip install -e ".[peer]" (transfusion-pytorch==0.20.0)') from None
    times: dict[str, list[float]] = {name: [] for name in variants}
    # every round takes the next order of all of them: whichever runs right after the peer's longer step
    # finds the caches cold, and a fixed order (or a rotation of one) would charge that to one variant more
    orders = list(itertools.permutations(variants))
    for i in range(args.warmup + args.steps):
        for name in orders[i % len(orders)]:
            step = variants[name][1]
            start = time.perf_counter()
            step()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
    tokens = args.batch * (TEXT_TOKENS + 16)
    result: dict[str, dict] = {}
    print(f"{'variant':<22} {'params':>10} {'median ms/step':>15} {'tokens/s':>10}")
    for name, (model, _) in variants.items():
        med = statistics.median(times[name])
        params = sum(p.numel() for p in model.parameters())
        result[name] = {"params": params, "median_step_ms": round(med * 1e3, 2), "tokens_per_s": round(tokens / med)}
        print(f"{name:<22} {params:>10,} {med * 1e3:>15.1f} {tokens / med:>10,.0f}")
    ratios = {"mot_over_dense_step": round(result["mot"]["median_step_ms"] / result["dense"]["median_step_ms"], 3)}
    if "transfusion-pytorch" in result:
        ratios["mot_throughput_over_peer"] = round(result["mot"]["tokens_per_s"]
                                                   / result["transfusion-pytorch"]["tokens_per_s"], 2)
    for name, value in ratios.items():
        print(f"{name}: {value}")
    # two graphs compiled (MoT's blocks, dense's): any more is a recompile, and each is reported
    compiled = compile_counts() if args.compile else None
    if compiled:
        print(f"compile: {compiled}")
    print(json.dumps({"benchmark": "peer_throughput", "batch": args.batch, "tokens_per_step": tokens,
                      "compile": compiled, "cpu": cpu_description(), "torch": torch.__version__, **ratios,
                      "variants": result}))


if __name__ == "__main__":
    main()
