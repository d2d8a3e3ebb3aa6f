"""Where the time of a training step goes: torch.profiler over steps of the demo's recipe on this CPU.

Builds the trainer of configs/train/shapes-tiny.yaml (batch 64, BPE captions, flow objective, EMA) on a latent
cache of shapes images, warms up, then profiles `--steps` steps and prints
  1. the step's parts: data (next batch), forward + loss, backward, gradient clipping, optimizer, EMA, and
     the rest of `train_step` (learning rate, statistics, host syncs), as measured inside the profile;
  2. self CPU time by kind of op: matmuls, attention, routing (index_select/argsort/split/cat), norms,
     elementwise, reductions and losses, optimizer and EMA kernels, and dispatch overhead (the time of a
     step no op accounts for: Python, autograd bookkeeping);
  3. the top ops by self CPU time.
The last line is one JSON object with the parts and kinds as fractions of the step.

    python benchmarks/profile_train_step.py [--steps 20] [--set train.compile=true ...]
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from train_throughput import make_cache  # benchmarks/train_throughput.py, beside this script

from transfusion_mot.common.device import cpu_description
from transfusion_mot.config import load_run_config
from transfusion_mot.recipes.train import build_trainer

# self-time kinds, first match wins (aten op names)
KINDS = [
    ("optimizer", r"adam|_fused_adamw|foreach_(add|mul|addcmul|addcdiv|sqrt|div|lerp_)|_foreach_norm"),
    ("matmul", r"aten::(mm|addmm|bmm|matmul|linear|baddbmm|_grouped_mm)$|mkldnn|onednn"),
    ("attention", r"scaled_dot_product|_flash_attention|_efficient_attention|softmax"),
    ("routing", r"aten::(index_select|index_copy|index_add|argsort|sort|bincount|split|split_with_sizes|cat|"
                r"index|index_put_|gather|scatter|nonzero|masked_select|embedding_dense_backward|embedding)"),
    ("norm", r"rms_norm|native_layer_norm|_fused_rms"),
    ("loss", r"cross_entropy|nll_loss|log_softmax|mse_loss"),
    ("copy/alloc", r"aten::(copy_|empty|empty_strided|zeros|zero_|fill_|clone|contiguous|to|_to_copy|ones|"
                   r"new_zeros|new_empty|full|zeros_like|empty_like|resize_)"),
    ("elementwise", r"aten::(add|sub|mul|div|silu|neg|cos|sin|exp|pow|rsqrt|sqrt|where|clamp|float|sigmoid|"
                    r"silu_backward|mean|sum|abs|eq|ne|ge|lt|gt|logical_not|bitwise|arange|randn|normal_|rand)"),
]
PARTS = ["data", "forward", "backward", "clip", "optimizer", "ema"]


def instrument(trainer) -> None:
    """Label the parts of `train_step` for the profiler (wrappers on the trainer's own objects)."""
    batches, step_module, optimizer, ema = trainer.data.batches, trainer.step_module, trainer.optimizer, trainer.ema

    class LabelledBatches:
        def __next__(self):
            with record_function("part:data"):
                return next(batches)

    def labelled(name, fn):
        def call(*args, **kwargs):
            with record_function(f"part:{name}"):
                return fn(*args, **kwargs)
        return call

    trainer.data.batches = LabelledBatches()
    forward = step_module.forward
    step_module.forward = labelled("forward", forward)
    optimizer.step = labelled("optimizer", optimizer.step)
    if ema is not None:
        ema.update = labelled("ema", ema.update)
    clip = torch.nn.utils.clip_grad_norm_
    torch.nn.utils.clip_grad_norm_ = labelled("clip", clip)


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, name):
            return kind
    return "other ops"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="shapes-tiny")
    ap.add_argument("--steps", type=int, default=20, help="profiled steps")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = make_cache(tmp, args.images)
        config = load_run_config(args.config, [f"data.path={cache}", "data.builtin=null", "data.val_path=null",
                                               "train.progress=false", "train.tensorboard=false",
                                               "train.max_steps=1000000", *args.set])
        trainer = build_trainer(config, tmp / "run")
        trainer.model.train()
        for step in range(args.warmup):
            trainer.train_step(step)
        instrument(trainer)
        tokens = 0
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for step in range(args.warmup, args.warmup + args.steps):
                with record_function("part:step"):
                    tokens += trainer.train_step(step).tokens
            wall = time.perf_counter() - start
    # profiling slows small ops: fractions of the profiled step are what this reports, not its absolute time
    events = prof.key_averages()
    part_us = {e.key.removeprefix("part:"): e.cpu_time_total for e in events if e.key.startswith("part:")}
    step_us = part_us.pop("step")
    parts = {p: part_us.get(p, 0.0) for p in PARTS}
    # backward runs inside the step, outside every labelled part
    parts["backward"] = sum(e.cpu_time_total for e in events if e.key.startswith("autograd::engine::evaluate_function"))
    parts["rest of train_step"] = step_us - sum(parts.values())
    kinds: dict[str, float] = defaultdict(float)
    ops = [e for e in events if not e.key.startswith(("part:", "autograd::engine", "Optimizer."))]
    for e in ops:
        kinds[kind_of(e.key)] += e.self_cpu_time_total
    kinds["dispatch and Python (no op)"] = step_us - sum(kinds.values())

    print(f"{config.train.batch_size} rows/step, {tokens / args.steps:,.0f} tokens/step, "
          f"{args.steps} profiled steps in {wall:.2f} s ({tokens / wall:,.0f} tokens/s under the profiler)")
    print(f"\n{'part of the step':<28} {'ms/step':>9} {'share':>7}")
    for name, us in parts.items():
        print(f"{name:<28} {us / 1e3 / args.steps:>9.2f} {us / step_us:>7.1%}")
    print(f"\n{'kind of op (self time)':<28} {'ms/step':>9} {'share':>7}")
    for name, us in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"{name:<28} {us / 1e3 / args.steps:>9.2f} {us / step_us:>7.1%}")
    print(f"\ntop {args.top} ops by self CPU time")
    print(f"{'op':<48} {'calls/step':>10} {'ms/step':>9} {'share':>7}")
    for e in sorted(ops, key=lambda e: -e.self_cpu_time_total)[:args.top]:
        print(f"{e.key[:48]:<48} {e.count / args.steps:>10.1f} {e.self_cpu_time_total / 1e3 / args.steps:>9.2f} "
              f"{e.self_cpu_time_total / step_us:>7.1%}")
    ops_per_step = sum(e.count for e in ops) / args.steps
    print(json.dumps({"benchmark": "profile_train_step", "config": args.config, "overrides": args.set,
                      "batch": config.train.batch_size, "tokens_per_step": round(tokens / args.steps),
                      "ops_per_step": round(ops_per_step), "step_ms_profiled": round(step_us / 1e3 / args.steps, 2),
                      "cpu": cpu_description(), "threads": torch.get_num_threads(),
                      "parts": {k: round(v / step_us, 4) for k, v in parts.items()},
                      "kinds": {k: round(v / step_us, 4) for k, v in kinds.items()}}))


if __name__ == "__main__":
    main()
