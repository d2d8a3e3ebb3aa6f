"""Sampling with the blocks compiled (`Pipeline.compile`, `tmot sample --compile`) against eager, side by side
in one process, at the demo's shapes.

The tiny model (configs/model/tiny.yaml, flow objective) with random weights: speed does not depend on them.
Each batch is `--batch` shapes prompts (different caption lengths) with classifier-free guidance `--cfg` and
`--steps` flow steps, 8x8x4 latents (16 image tokens), as the demo samples. The captions are byte tokens here,
several times longer than the demo's BPE captions; each denoising step runs the image tokens only. The
compiled copy's first batch is timed on its own: it compiles the graphs (caption prefix, denoising step).
Then eager and compiled batches alternate `--repeats` times on new prompts, so machine noise hits both alike;
medians are reported, with the compile cost, the number of images after which compiling has paid for itself,
the largest latent difference, and what compile did (graphs, graph breaks, frames left eager: a recompile
shows as a graph). The last line of output is one JSON object.

    python benchmarks/sampling_compile.py [--batch 64 --steps 50 --cfg 5 --repeats 5 --backend inductor]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from transfusion_mot.common.cli import positive_int
from transfusion_mot.common.compile import compile_blocks, compile_counts
from transfusion_mot.common.device import cpu_description
from transfusion_mot.config import ModelConfig
from transfusion_mot.data.shapes import COLOURS, RELATIONS, SHAPES, SIZES, make_caption
from transfusion_mot.inference.sampling import generate_latents
from transfusion_mot.model import TransfusionMoT
from transfusion_mot.tokenizer import ByteTokenizer

ROOT = Path(__file__).resolve().parents[1]
LATENT = (4, 8, 8)


def prompts(n: int, seed: int) -> list[str]:
    """`n` shapes captions of mixed lengths (one or two objects)."""
    rng = random.Random(seed)

    def obj() -> dict[str, str]:
        return {"size": rng.choice(list(SIZES)), "colour": rng.choice(list(COLOURS)), "shape": rng.choice(SHAPES)}

    return [make_caption([obj()]) if rng.random() < 0.7 else make_caption([obj(), obj()], rng.choice(RELATIONS))
            for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "configs/model/tiny.yaml"))
    ap.add_argument("--batch", type=positive_int, default=64, help="prompts per batch (twice as many rows with guidance)")
    ap.add_argument("--steps", type=positive_int, default=50)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--repeats", type=positive_int, default=5, help="timed batches per variant")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: no C++ build, for checks)")
    args = ap.parse_args()

    tokenizer = ByteTokenizer()
    torch.manual_seed(0)
    config = ModelConfig.from_yaml(args.model)
    config.objective = "flow"
    eager = TransfusionMoT(config).eval()
    with torch.no_grad():  # the default init zeroes the image head; any non-zero head will do for timing
        eager.image_head.weight.normal_(std=0.02)
    compiled = TransfusionMoT(config).eval()
    compiled.load_state_dict(eager.state_dict())
    before = compile_counts()
    compile_blocks(compiled, backend=args.backend)
    kw = {"latent_shape": LATENT, "scheduler": "flow", "num_steps": args.steps, "cfg_scale": args.cfg,
          "batch_size": args.batch}

    def timed(model: TransfusionMoT, batch: list[str]) -> tuple[float, torch.Tensor]:
        start = time.perf_counter()
        latents = generate_latents(model, tokenizer, batch, seed=0, **kw)
        return time.perf_counter() - start, latents

    first_prompts = prompts(args.batch, 0)
    timed(eager, first_prompts)  # warm-up
    first_s, _ = timed(compiled, first_prompts)
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    max_diff = 0.0
    for r in range(args.repeats):
        batch = prompts(args.batch, r + 1)
        order = (("eager", eager), ("compiled", compiled)) if r % 2 == 0 else (("compiled", compiled), ("eager", eager))
        out = {}
        for name, model in order:
            seconds, out[name] = timed(model, batch)
            times[name].append(seconds)
        max_diff = max(max_diff, float((out["eager"] - out["compiled"]).abs().max()))
    after = compile_counts()
    med = {k: statistics.median(v) for k, v in times.items()}
    compile_s = first_s - med["compiled"]
    per_image_saved = (med["eager"] - med["compiled"]) / args.batch
    result = {
        "benchmark": "sampling_compile", "backend": args.backend, "batch": args.batch, "steps": args.steps, "cfg": args.cfg,
        "repeats": args.repeats, "eager_s": round(med["eager"], 3), "compiled_s": round(med["compiled"], 3),
        "compiled_over_eager": round(med["compiled"] / med["eager"], 3), "first_compiled_batch_s": round(first_s, 1),
        "compile_s": round(compile_s, 1),
        "break_even_images": round(compile_s / per_image_saved) if per_image_saved > 0 else None,
        "max_abs_latent_diff": max_diff,
        "compile": {k: after[k] - before[k] for k in after}, "cpu": cpu_description(), "torch": torch.__version__,
    }
    pays = f"pays from ~{result['break_even_images']} images" if result["break_even_images"] else "never pays"
    print(f"{args.batch} prompts x {args.steps} steps, cfg {args.cfg}: eager {med['eager']:.2f} s, compiled "
          f"{med['compiled']:.2f} s per batch ({result['compiled_over_eager']}x); first compiled batch {first_s:.1f} s "
          f"(compiling ~{compile_s:.1f} s): {pays}; max |latent diff| "
          f"{max_diff:.1e}; compile: {result['compile']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
