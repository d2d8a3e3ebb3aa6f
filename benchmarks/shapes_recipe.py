"""One point of the shapes-recipe sweep: train configs/train/shapes-tiny.yaml with overrides, then score
what it draws with the shapes classifier on the demo's prompts and on prompts it was not tuned on.

Each call appends one JSON row to OUT/results.jsonl (and prints it last): the overrides, steps, training
time, held-out losses (fixed draws), and per prompt set and sampler setting colour / shape / size /
position / all-correct. The data (images, VAE, latents, tokenizer) and the classifier are built once under
--data-dir and reused, as `tmot demo` builds them. Run two at a time with --threads 1 to use both cores
for quality sweeps at equal steps; time per step is only comparable between runs made alone.

    python benchmarks/shapes_recipe.py --name base --steps 4000
    python benchmarks/shapes_recipe.py --name lr2e-3 --steps 4000 --set optim.lr=0.002
    python benchmarks/shapes_recipe.py --name ddpm --steps 4000 --set model.objective=ddpm --samplers ddim:50:5
    python benchmarks/shapes_recipe.py --table          # the table of every point so far (OUT/results.jsonl)
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from transfusion_mot.run_dir import RunDir

REPO = Path(__file__).resolve().parents[1]


SETS = ("demo", "small objects", "single object with a position", "two objects with a relation")


def render_table(rows: list[dict]) -> str:
    """results.jsonl as a markdown table: one line per run and sampler setting; colour / shape / all correct
    on each prompt set."""
    lines = ["| variant | overrides | steps | train s | held-out image loss | captioning loss | sampler | "
             + " | ".join(f"{s}: colour / shape / all" for s in SETS) + " |", "|" + "---|" * (7 + len(SETS))]
    for row in rows:
        specs = sorted({k.split(" @ ")[1] for k in row if " @ " in k}, key=lambda s: (s != "default:50:5", s))
        for spec in specs:
            cells = []
            for name in SETS:
                v = row.get(f"{name} @ {spec}")
                cells.append("–" if v is None else
                             f"{100 * v['colour']:.0f} / {100 * v['shape']:.0f} / **{100 * v['all_correct']:.0f}**")
            first = spec == specs[0]
            lines.append(f"| {row['name'] if first else ''} | {' '.join(row['set']) if first and row['set'] else ''} | "
                         f"{row['steps'] if first else ''} | {row['train_time_s'] if first else ''} | "
                         f"{row['val']['val_image_loss'] if first else ''} | {row['val']['val_caption_loss'] if first else ''} | "
                         f"{spec} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default=None, help="this point's name in the table (required unless --table)")
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="training config override")
    ap.add_argument("--config", default=str(REPO / "configs/train/shapes-tiny.yaml"))
    ap.add_argument("--samplers", default="default:50:5",
                    help="comma-separated SCHEDULER:STEPS:CFG (default = the objective's own scheduler)")
    ap.add_argument("--images-per-prompt", type=int, default=4)
    ap.add_argument("--heldout-images-per-prompt", type=int, default=1,
                    help="images per held-out prompt (the sweep in BENCHMARKS.md used 1; tmot demo uses 2)")
    ap.add_argument("--vae-steps", type=int, default=None,
                    help="train the tiny VAE for N steps (default: the recipe's, the shipped one)")
    ap.add_argument("--num-images", type=int, default=20000)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--data-dir", default="tmot_data/recipe")
    ap.add_argument("--out", default="shapes_recipe")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--table", action="store_true", help="print OUT/results.jsonl as a markdown table and exit")
    args = ap.parse_args()
    if args.table:
        print(render_table([json.loads(line) for line in (Path(args.out) / "results.jsonl").read_text().splitlines()]))
        return
    if not args.name:
        ap.error("--name is required")
    if args.threads:
        torch.set_num_threads(args.threads)

    from eval.align import load_classifier, score_alignment, train_shapes_classifier
    from transfusion_mot.common.images import image_grid
    from transfusion_mot.config import load_run_config
    from transfusion_mot.inference.pipeline import Pipeline
    from transfusion_mot.recipes.demo import DEMO_SET, prompt_sets
    from transfusion_mot.recipes.prepare import prepare_for_run
    from transfusion_mot.recipes.train import train

    config = load_run_config(args.config, [f"train.max_steps={args.steps}", "train.progress=false",
                                           "train.tensorboard=false", f"train.save_every={args.steps}",
                                           f"train.seed={args.seed}", *args.set])
    config.data.builtin_num_images = args.num_images
    if args.vae_steps is not None:
        config.data.builtin_vae, config.data.builtin_vae_steps = "train", args.vae_steps
    vae = f"vae{config.data.builtin_vae_steps}" if config.data.builtin_vae == "train" else "shipped"
    prepare_for_run(config, root=Path(args.data_dir) / f"shapes-32-n{args.num_images}-{vae}", progress=False)
    config.train.eval_every = config.train.eval_every or max(1, args.steps // 8)

    out = Path(args.out)
    run = out / "runs" / args.name
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.perf_counter()
    train(config, run)
    wall = time.perf_counter() - t0
    metrics = RunDir(run).read_metrics()
    summary = RunDir(run).read_summary()
    evals = [m for m in metrics if "val_image_loss" in m]
    row = {"name": args.name, "steps": args.steps, "set": args.set, "threads": torch.get_num_threads(),
           "train_time_s": round(summary["train_time_s"], 1), "wall_s": round(wall, 1),
           "s_per_step": round(summary["train_time_s"] / args.steps, 4),
           "val": {k: round(v, 4) for k, v in evals[-1].items() if k.startswith("val_")},
           "val_image_curve": [(m["step"], round(m["val_image_loss"], 4)) for m in evals]}

    classifier_dir = Path(args.data_dir) / "shapes-classifier"
    if not (classifier_dir / "config.json").is_file():
        train_shapes_classifier(classifier_dir, image_size=32, steps=1000, seed=0)
    classifier = load_classifier(classifier_dir)
    pipe = Pipeline.from_run(run, device="cpu")
    sets = {("demo" if name == DEMO_SET else name.removeprefix("held out: ")): prompts_seeds
            for name, prompts_seeds in prompt_sets(args.seed, args.images_per_prompt,
                                                   args.heldout_images_per_prompt).items()}
    for spec in args.samplers.split(","):
        scheduler, steps, cfg = spec.split(":")
        for name, (prompts, seeds) in sets.items():
            images = pipe.generate(prompts, seed=seeds, cfg_scale=float(cfg), num_steps=int(steps),
                                   scheduler=None if scheduler == "default" else scheduler, batch_size=64)
            score = score_alignment(classifier, images, prompts)
            row[f"{name} @ {spec}"] = {k: score[k] for k in ("colour", "shape", "size", "position", "all_correct")}
            if name == "demo":
                image_grid([im.resize((64, 64), resample=0) for im in images],
                           cols=4 * args.images_per_prompt).save(run / f"grid-{scheduler}-{steps}-{cfg}.png")
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
