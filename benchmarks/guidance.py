"""Guidance settings compared on trained shapes models, sampling only: the scale (CFG) and guidance rescale.

For each run (e.g. the `run/` of `tmot demo --out DIR --seed S` for a few seeds) and each setting
`CFG:RESCALE`, samples a validation set of shapes prompts and seeds that the demo's report does not use and
scores it with the shipped shapes classifier: every size x colour x shape with 4 seeds (256 singles), 64
single objects with a position phrase, 64 pairs with a relation (seeds from 30,000 on, prompts drawn with a
fixed generator), 50 flow steps. Also reports the mean green channel of orange objects (32 orange prompts,
saturated pixels only; the palette's orange is (250, 135, 20), yellow (250, 225, 30)): guidance that
overshoots draws oranges lighter, towards yellow. The last line is one JSON object.

    python benchmarks/guidance.py --run tmot_demo/run [--run other/run ...] [--settings 5:0 5:0.7 4:0]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics

import numpy as np

from eval.align import load_classifier, score_alignment
from transfusion_mot.data.shapes import COLOURS, SHAPES, SIZES
from transfusion_mot.inference.pipeline import Pipeline
from transfusion_mot.recipes.demo import positioned_and_pair_prompts

SEED = 30_000  # first sampling seed of the validation set; the demo's sets use seed + 0.. and seed + 10,000..


def validation_sets() -> dict[str, list[str]]:
    """Singles (every size x colour x shape, 4 each), positioned singles and pairs (64 each, fixed draws)."""
    positioned, pairs = positioned_and_pair_prompts(random.Random("cfg-validation"), 64)
    singles = [f"a {z} {c} {s}" for z in SIZES for c in COLOURS for s in SHAPES for _ in range(4)]
    return {"singles": singles, "positioned": positioned, "pairs": pairs}


def orange_green(pipe: Pipeline, cfg: float, rescale: float, steps: int) -> float | None:
    """Mean green channel of the saturated pixels of 32 orange objects (both sizes, every shape, 4 seeds);
    None when no image has any."""
    prompts = [f"a {z} orange {s}" for z in SIZES for s in SHAPES for _ in range(4)]
    greens = []
    for image in pipe.generate(prompts, seed=list(range(5000, 5000 + len(prompts))), cfg_scale=cfg,
                               guidance_rescale=rescale, num_steps=steps, batch_size=64):
        rgb = np.asarray(image).reshape(-1, 3).astype(float)
        saturated = rgb[(rgb.max(1) - rgb.min(1)) > 60]
        if len(saturated):
            greens.append(saturated[:, 1].mean())
    return round(float(np.mean(greens)), 1) if greens else None


def _mean(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    return f"{statistics.mean(known):5.1f}" if known else "  n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", required=True, help="a training run directory (repeatable)")
    ap.add_argument("--settings", nargs="+", default=["5:0", "5:0.7", "4:0"], help="CFG:RESCALE pairs")
    ap.add_argument("--steps", type=int, default=50, help="flow steps per image (50: the demo's)")
    args = ap.parse_args()
    try:
        settings = [tuple(float(v) for v in spec.split(":")) for spec in args.settings]
    except ValueError:
        settings = []
    if not settings or any(len(s) != 2 for s in settings):
        raise SystemExit(f"error: --settings takes CFG:RESCALE pairs such as 5:0.7, got {args.settings}")
    classifier, sets = load_classifier(None), validation_sets()
    results: dict[str, dict[str, dict]] = {}
    for run in args.run:
        pipe = Pipeline.from_run(run, device="cpu")
        for cfg, rescale in settings:
            row: dict[str, object] = {}
            for k, (name, prompts) in enumerate(sets.items()):
                seeds = list(range(SEED + 1000 * k, SEED + 1000 * k + len(prompts)))
                images = pipe.generate(prompts, seed=seeds, cfg_scale=cfg, guidance_rescale=rescale,
                                       num_steps=args.steps, batch_size=64)
                scores = score_alignment(classifier, images, prompts)
                row[name] = {key: scores[key] for key in ("colour", "shape", "all_correct")}
            row["orange_green"] = orange_green(pipe, cfg, rescale, args.steps)
            results.setdefault(f"{cfg:g}:{rescale:g}", {})[run] = row
            print(f"{run}  CFG {cfg:g} rescale {rescale:g}: " + "  ".join(
                f"{n} {100 * v['colour']:.1f} / {100 * v['shape']:.1f} / {100 * v['all_correct']:.1f}"
                for n, v in row.items() if isinstance(v, dict)) + f"  orange green {row['orange_green']}", flush=True)
    print("\nsetting     singles colour / shape / all   positioned all   pairs all   orange green  (mean over runs)")
    for setting, runs in results.items():
        rows = list(runs.values())
        mean = {n: {k: 100 * statistics.mean(r[n][k] for r in rows) for k in ("colour", "shape", "all_correct")}
                for n in sets}
        print(f"{setting:<11} {mean['singles']['colour']:5.1f} / {mean['singles']['shape']:4.1f} / "
              f"{mean['singles']['all_correct']:4.1f}          {mean['positioned']['all_correct']:5.1f}"
              f"            {mean['pairs']['all_correct']:4.1f}       "
              f"{_mean([r['orange_green'] for r in rows])}")
    print(json.dumps({"benchmark": "guidance", "runs": args.run, "results": results}))


if __name__ == "__main__":
    main()
