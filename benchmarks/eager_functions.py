"""The eager training step with the model's autograd functions against what they replaced.

`RotaryFunction` and `SwiGLUFunction` (transfusion_mot.model) compute what the composites compute (compile
runs the composites, which inductor fuses), with the outputs' and gradients' halves written into one buffer
instead of a cat; `RMSNormFunction` saves an fp32 input's normalised x for its backward instead of
recomputing it there. This times a full eager training step (forward, loss, backward, fused AdamW) of the MoT
and the dense model at the tiny shape of `peer_throughput.py` as the model runs it ("current"), with the
composites ("composites"), with the norm recomputing ("recomputing norm") and with both ("both": the step
before these functions), in a fresh random order every round in one process, after checking that every
variant gives the same loss and gradients. The last line is one JSON object with the ratios (current / each
other variant).

    python benchmarks/eager_functions.py [--batch 32 --steps 50]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from contextlib import contextmanager

import torch
from peer_throughput import our_batch, our_model, ours

from transfusion_mot import model as model_module
from transfusion_mot.common.device import cpu_description
from transfusion_mot.diffusion import make_objective
from transfusion_mot.losses import TransfusionStep


class RecomputingRMSNorm(model_module.RMSNormFunction):
    """The model's RMSNorm saving x, whose backward then recomputes the normalised x."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
        xf = x.float()
        rstd = xf.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
        ctx.save_for_backward(x, rstd, weight)
        ctx.dtype, ctx.saved_normalised = x.dtype, False
        y = xf * rstd
        return (y if weight is None else y * weight).to(x.dtype)


VARIANTS = ("current", "composites", "recomputing norm", "both")


@contextmanager
def variant(name: str):
    """The model as it is ("current"), or with its functions replaced by what they replaced."""
    saved = model_module.apply_rope, model_module.swiglu, model_module.RMSNormFunction
    if name in ("composites", "both"):
        model_module.apply_rope, model_module.swiglu = model_module.rope_composite, model_module.swiglu_composite
    if name in ("recomputing norm", "both"):
        model_module.RMSNormFunction = RecomputingRMSNorm
    try:
        yield
    finally:
        model_module.apply_rope, model_module.swiglu, model_module.RMSNormFunction = saved


def same_step(untie: list[str], batch_size: int) -> None:
    """One step's loss and gradients agree in every variant."""
    results = []
    for name in VARIANTS:
        model = our_model(untie, 0)
        batch = our_batch(model.config, batch_size, 0)
        with variant(name):
            loss = TransfusionStep(model, make_objective(model.config))(batch, torch.Generator().manual_seed(1))["loss"]
            loss.backward()
        results.append([loss.detach()] + [p.grad for p in model.parameters()])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=50, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args()
    models = {"mot": ["attn", "ffn", "norm"], "dense": []}
    for untie in models.values():
        same_step(untie, args.batch)
    steps = {name: ours(untie, args.batch, False, 0)[1] for name, untie in models.items()}
    variants = [(name, v) for name in models for v in VARIANTS]
    times: dict[tuple[str, str], list[float]] = {v: [] for v in variants}
    order = random.Random(0)
    for i in range(args.warmup + args.steps):
        for name, v in order.sample(variants, len(variants)):  # a fresh order every round
            with variant(v):
                start = time.perf_counter()
                steps[name]()
                elapsed = time.perf_counter() - start
            if i >= args.warmup:
                times[(name, v)].append(elapsed)
    med = {v: statistics.median(t) * 1e3 for v, t in times.items()}
    result = {}
    print(f"{'model':<6} " + " ".join(f"{v + ' ms':>20}" for v in VARIANTS) + "   current / others")
    for name in models:
        ratios = {f"current_over_{v.replace(' ', '_')}": round(med[(name, "current")] / med[(name, v)], 3)
                  for v in VARIANTS[1:]}
        result[name] = {"ms": {v: round(med[(name, v)], 2) for v in VARIANTS}, **ratios}
        print(f"{name:<6} " + " ".join(f"{med[(name, v)]:>20.1f}" for v in VARIANTS) + f"   {list(ratios.values())}")
    mot_over_dense = {v: round(med[("mot", v)] / med[("dense", v)], 3) for v in VARIANTS}
    print(f"MoT / dense: {mot_over_dense}")
    print(json.dumps({"benchmark": "eager_functions", "batch": args.batch, "steps": args.steps,
                      "cpu": cpu_description(), "torch": torch.__version__, "mot_over_dense": mot_over_dense,
                      "variants": result}))


if __name__ == "__main__":
    main()
