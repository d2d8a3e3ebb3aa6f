"""The eager training step with the model's RoPE and SwiGLU autograd functions against the composite formulas.

`RotaryFunction` and `SwiGLUFunction` (transfusion_mot.model) compute what the composites compute (compile
runs the composites, which inductor fuses), with the outputs' and gradients' halves written into one buffer
instead of a cat. This times a full eager training step (forward, loss, backward, fused AdamW) of the MoT and
the dense model at the tiny shape of `peer_throughput.py` with each, interleaved round by round in one
process, and checks first that both give the same loss and gradients. The last line is one JSON object with
the ratios (functions / composites).

    python benchmarks/eager_functions.py [--batch 32 --steps 50]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from peer_throughput import our_batch, our_model, ours

from transfusion_mot import model as model_module
from transfusion_mot.common.device import cpu_description
from transfusion_mot.diffusion import make_objective
from transfusion_mot.losses import TransfusionStep


def composite_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


def composite_swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


@contextmanager
def composites(enabled: bool):
    """The model's apply_rope and swiglu replaced by the composite formulas while `enabled`."""
    saved = model_module.apply_rope, model_module.swiglu
    if enabled:
        model_module.apply_rope, model_module.swiglu = composite_rope, composite_swiglu
    try:
        yield
    finally:
        model_module.apply_rope, model_module.swiglu = saved


def same_step(untie: list[str], batch_size: int) -> None:
    """One step's loss and gradients agree with the functions and with the composites."""
    results = []
    for enabled in (False, True):
        model = our_model(untie, 0)
        batch = our_batch(model.config, batch_size, 0)
        with composites(enabled):
            loss = TransfusionStep(model, make_objective(model.config))(batch, torch.Generator().manual_seed(1))["loss"]
            loss.backward()
        results.append([loss.detach()] + [p.grad for p in model.parameters()])
    for a, b in zip(*results):
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
    variants = [(name, enabled) for name in models for enabled in (False, True)]  # enabled: composites
    times: dict[tuple[str, bool], list[float]] = {v: [] for v in variants}
    orders = list(itertools.permutations(variants))
    for i in range(args.warmup + args.steps):
        for name, enabled in orders[i % len(orders)]:
            with composites(enabled):
                start = time.perf_counter()
                steps[name]()
                elapsed = time.perf_counter() - start
            if i >= args.warmup:
                times[(name, enabled)].append(elapsed)
    med = {v: statistics.median(t) * 1e3 for v, t in times.items()}
    result = {}
    print(f"{'model':<6} {'functions ms':>13} {'composites ms':>14} {'ratio':>7}")
    for name in models:
        ratio = med[(name, False)] / med[(name, True)]
        result[name] = {"functions_ms": round(med[(name, False)], 2), "composites_ms": round(med[(name, True)], 2),
                        "functions_over_composites": round(ratio, 3)}
        print(f"{name:<6} {med[(name, False)]:>13.1f} {med[(name, True)]:>14.1f} {ratio:>7.3f}")
    mot_over_dense = {"functions": round(med[("mot", False)] / med[("dense", False)], 3),
                      "composites": round(med[("mot", True)] / med[("dense", True)], 3)}
    print(f"MoT / dense: {mot_over_dense}")
    print(json.dumps({"benchmark": "eager_functions", "batch": args.batch, "steps": args.steps,
                      "cpu": cpu_description(), "torch": torch.__version__, "mot_over_dense": mot_over_dense,
                      "variants": result}))


if __name__ == "__main__":
    main()
