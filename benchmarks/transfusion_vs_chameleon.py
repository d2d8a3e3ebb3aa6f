"""Transfusion (diffusion on continuous latents) against Chameleon (next-token loss on VQ codes) on the
built-in shapes, each as MoT and as its dense baseline, at equal training FLOPs and at equal steps.

    transfusion   configs/train/shapes-tiny.yaml            image_objective diffusion, 16 patches per image
    chameleon     configs/train/shapes-chameleon-tiny.yaml  image_objective tokens, 64 codes per image

Chameleon trains `--steps` steps. Transfusion trains the steps that cost the same training FLOPs (6 x active
parameters per token plus attention, per document, the accounting summary.json uses, over the mean layout
of the data: its sequences are shorter, so it takes more steps), and, for the equal-steps comparison,
`--steps` steps too. Every run of a setting shares its config, data order and seed; MoT and dense start
from one draw (copied experts: MoT computes the dense model's function at step 0), so within a setting
only the untying differs. Each run is scored on the held-out draws of its own objective (image loss: MSE
for diffusion, nats per code for tokens: not comparable across settings), on the shapes classifier's
alignment for the validation captions and the demo prompts, FID at equal n against the same reference
statistics, and sampling seconds per image (50 flow steps; 64 codes with a KV cache; both with CFG 3).
MoT's steps_ratio in each setting: the first evaluation at which MoT's held-out image loss is at or below
dense's final one, over dense's steps (null: never).

    python benchmarks/transfusion_vs_chameleon.py --steps 1500 --jobs 2 --threads 1
    python benchmarks/transfusion_vs_chameleon.py --steps 30 --bench-n 32     # a quick check

Writes OUT/results.md (the table), OUT/results.json, OUT/curves.png and, last on stdout, one JSON line with
at least transfusion_mot_all_correct, chameleon_mot_all_correct, transfusion_mot_steps_ratio,
chameleon_mot_steps_ratio, transfusion_sample_s_per_image and chameleon_sample_s_per_image.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from mot_vs_dense import bench_variant, reference_stats, summarise, train_variant

from transfusion_mot.common.device import cpu_summary
from transfusion_mot.run_dir import RunDir

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"transfusion": REPO / "configs/train/shapes-tiny.yaml",
           "chameleon": REPO / "configs/train/shapes-chameleon-tiny.yaml"}


def prepare(setting: str, args: argparse.Namespace) -> dict[str, Any]:
    """The built-in shapes data of a setting (its autoencoder and caches; one image folder for both)."""
    from transfusion_mot.config import load_run_config
    from transfusion_mot.recipes.prepare import prepare_for_run

    config = load_run_config(CONFIGS[setting], [*args.set, f"train.seed={args.seed}", "data.builtin=shapes"])
    prepared = prepare_for_run(config, progress=False)
    return {"config": CONFIGS[setting], "data": config.data.path, "val": config.data.val_path,
            "vae": config.vae.path, "images": str(prepared.data_dir), "shapes": True, "run_config": config}


def flops_per_sample(data: dict[str, Any]) -> float:
    """Training FLOPs of one caption-image sample of this setting's data: 6 x active parameters of each
    position's modality, plus 12 x n_layers x dim per (query, key) pair of its document, over the data's mean
    caption length (words: the shapes BPE gives every word one token) and its image token count."""
    from transfusion_mot.accounting import parameter_accounting
    from transfusion_mot.data.latents import LatentDataset
    from transfusion_mot.model import TransfusionMoT

    config = copy.deepcopy(data["run_config"].model)
    dataset = LatentDataset(data["data"])
    captions = [len(text.split()) for text, _ in zip(dataset.captions(), range(2000))]
    shape = dataset.latent_shape
    image = shape[0] * shape[1] if config.image_tokens else (shape[1] // config.patch_size) * (shape[2] // config.patch_size)
    text = sum(captions) / len(captions) + 4  # BOS, BOI, EOI, EOS
    with torch.device("meta"):
        acc = parameter_accounting(TransfusionMoT(config))
    active = acc["active_params_per_token"]
    return 6 * (active["text"] * text + active["image"] * image) + acc["attention_flops_per_token_pair"] * (text + image) ** 2


def run_setting(setting: str, steps: int, tag: str, data: dict[str, Any], args: argparse.Namespace,
                out: Path) -> dict[str, Path]:
    """MoT and dense of one setting for `steps` steps into OUT/SETTING-TAG/runs/{mot,dense}."""
    run_args = copy.copy(args)
    run_args.steps, run_args.eval_every, run_args.seeds = steps, max(1, steps // 10), [args.seed]
    run_args.expert_init = "copy"
    where = out / f"{setting}-{tag}"
    where.mkdir(parents=True, exist_ok=True)
    names = ("mot", "dense")
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:  # --jobs 2 --threads 1: both at once
        return dict(zip(names, pool.map(lambda name: train_variant(name, args.seed, data, run_args, where), names)))


def score(runs: dict[str, Path], data: dict[str, Any], args: argparse.Namespace, classifier: Path | None,
          stats: Path | None) -> dict[str, Any]:
    """Held-out losses and steps_ratio (mot_vs_dense's), then per run (unless --bench-n 0): alignment and FID
    at equal n on the validation captions (`tmot eval bench`), alignment on the demo's prompt sets, sampling
    seconds per image."""
    records = {name: RunDir(run).read_metrics() for name, run in runs.items()}
    result = summarise(records, {name: RunDir(run).read_summary() for name, run in runs.items()})
    for name, run in runs.items():
        v = result["variants"][name]
        v["sample_s_per_image"] = None
        if classifier is None:
            continue
        v.update(bench_variant(run, args.seed, data, args, classifier, stats))
        report = json.loads((run / "bench" / "report.json").read_text())
        v["sample_s_per_image"] = round(report["generation"]["seconds"] / max(1, report["n"]), 4)
        v.update(demo_alignment(run, classifier, args))
    return result


def demo_alignment(run: Path, classifier: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The shapes classifier on `tmot demo`'s prompt sets: the demo prompts (every colour x shape) and the
    held-out sets the recipes were not tuned on (small objects, positions, relations, other seeds), with the
    demo's seeds; all-correct per set, colour and shape on the demo prompts."""
    from eval.align import score_alignment

    from transfusion_mot.inference.pipeline import load_pipeline
    from transfusion_mot.recipes.demo import DEMO_SET, prompt_sets

    done = run / "demo-align.json"
    if done.is_file():
        return json.loads(done.read_text())
    pipe = load_pipeline(run, device="cpu")
    result: dict[str, Any] = {}
    sets = prompt_sets(args.seed, images_per_prompt=args.images_per_prompt,
                       heldout_images_per_prompt=args.images_per_prompt)
    for name, (prompts, seeds) in sets.items():
        scores = score_alignment(classifier, pipe.generate(prompts, seed=seeds, batch_size=32), prompts)
        if name == DEMO_SET:
            result.update({f"demo_{k}": scores[k] for k in ("colour", "shape", "all_correct")})
        else:
            result[f"{name.removeprefix('held out: ')} all correct"] = scores["all_correct"]
    done.write_text(json.dumps(result) + "\n")
    return result


def render(results: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"### Transfusion vs Chameleon on shapes: {meta['steps']} Chameleon steps, Transfusion at equal FLOPs "
             f"({meta['transfusion_equal_flops_steps']} steps) and equal steps; {meta['cpu']}", "",
             "| setting | model | steps | train FLOPs | val image loss | val text loss | val caption loss | "
             "MoT steps_ratio | colour | shape | all correct | demo all correct | FID | sample s/image | train s |",
             "|" + "---|" * 15]

    def pct(x: Any) -> str:
        return "–" if x is None else f"{100 * x:.1f}%"

    for key, result in results.items():
        setting, _, tag = key.partition("-")
        for name, v in result["variants"].items():
            ratio = result["steps_ratio"] if name == "mot" else None
            fid = "–" if v.get("fid") is None else f"{v['fid']:.1f}"
            sample_s = "–" if v["sample_s_per_image"] is None else f"{v['sample_s_per_image']:.3f}"
            lines.append(
                f"| {setting} ({tag.replace('_', ' ')}) | {name} | {v['steps']} | {v['train_flops']:.3g} | "
                f"{v['val_image_loss']:.4f} | {v['val_text_loss']:.4f} | {v['val_caption_loss']:.4f} | "
                f"{'–' if name != 'mot' else ratio if ratio is not None else 'never'} | {pct(v.get('align_colour'))} | "
                f"{pct(v.get('align_shape'))} | {pct(v.get('align_all_correct'))} | {pct(v.get('demo_all_correct'))} | "
                f"{fid} | {sample_s} | "
                f"{v['train_time_s']:.0f} |")
    held = [k for k in next(iter(next(iter(results.values()))["variants"].values())) if k.endswith(" all correct")]
    if held:
        lines += ["", "All correct on the held-out prompt sets (`tmot demo`'s, not tuned on):", "",
                  "| setting | model | " + " | ".join(held) + " |", "|---|---|" + "---|" * len(held)]
        for key, result in results.items():
            for name, v in result["variants"].items():
                lines.append(f"| {key.replace('-', ' (').replace('_', ' ')}) | {name} | "
                             + " | ".join(pct(v.get(k)) for k in held) + " |")
    lines += ["", "Image losses are each objective's own (MSE of the flow velocity; nats per code) and are not "
              "comparable across settings; alignment, FID and sampling time are. FLOPs: 6 x active parameters per "
              "token plus attention, over the data's mean layout."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1500, help="Chameleon's training steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-samples", type=int, default=512)
    ap.add_argument("--bench-n", type=int, default=256,
                    help="images per run for FID and alignment (0: held-out losses only, no sampling)")
    ap.add_argument("--images-per-prompt", type=int, default=1, help="images per prompt of the demo's prompt sets")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="applies to every run")
    ap.add_argument("--threads", type=int, default=max(1, torch.get_num_threads()))
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--out", default="transfusion_vs_chameleon")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = {setting: prepare(setting, args) for setting in CONFIGS}
    flops = {setting: flops_per_sample(d) for setting, d in data.items()}
    equal_flops = max(1, round(args.steps * flops["chameleon"] / flops["transfusion"]))
    plan = {"chameleon-equal_steps": ("chameleon", args.steps), "transfusion-equal_flops": ("transfusion", equal_flops),
            "transfusion-equal_steps": ("transfusion", args.steps)}
    classifier, stats = None, None
    if args.bench_n > 0:
        classifier = out / "shapes-classifier"
        if not (classifier / "config.json").is_file():
            from eval.align import train_shapes_classifier

            train_shapes_classifier(classifier, image_size=32, steps=1000, seed=args.seed)
        stats = reference_stats(data["chameleon"]["images"], out)
    results, curves = {}, {}
    for key, (setting, steps) in plan.items():
        batch = data[setting]["run_config"].train.batch_size
        runs = run_setting(setting, steps, key.partition("-")[2], data[setting], args, out)
        results[key] = score(runs, data[setting], args, classifier, stats)
        for name, run in runs.items():
            results[key]["variants"][name]["train_flops"] = steps * batch * flops[setting]
            curves[f"{key}/{name}"] = RunDir(run).read_metrics()
    from transfusion_mot.training.curves import plot_curves

    plot_curves(curves, out / "curves.png", title=f"Transfusion vs Chameleon on shapes ({args.steps} Chameleon steps)")
    meta = {"steps": args.steps, "transfusion_equal_flops_steps": equal_flops,
            "flops_per_sample": {k: round(v) for k, v in flops.items()}, "cpu": cpu_summary(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cpus", "wall_s": round(time.perf_counter() - t0, 1),
            "command": " ".join(["python benchmarks/transfusion_vs_chameleon.py", *sys.argv[1:]])}
    (out / "results.json").write_text(json.dumps({**meta, "results": results}, indent=2) + "\n")
    (out / "results.md").write_text(render(results, meta) + f"\n![curves](curves.png)\n\n`{meta['command']}`\n")
    print((out / "results.md").read_text())
    t, c = results["transfusion-equal_flops"], results["chameleon-equal_steps"]
    line = {"transfusion_mot_all_correct": t["variants"]["mot"].get("align_all_correct"),
            "chameleon_mot_all_correct": c["variants"]["mot"].get("align_all_correct"),
            "transfusion_mot_demo_all_correct": t["variants"]["mot"].get("demo_all_correct"),
            "chameleon_mot_demo_all_correct": c["variants"]["mot"].get("demo_all_correct"),
            "transfusion_mot_steps_ratio": t["steps_ratio"], "chameleon_mot_steps_ratio": c["steps_ratio"],
            "transfusion_sample_s_per_image": t["variants"]["mot"]["sample_s_per_image"],
            "chameleon_sample_s_per_image": c["variants"]["mot"]["sample_s_per_image"],
            "transfusion_mot_fid": t["variants"]["mot"].get("fid"), "chameleon_mot_fid": c["variants"]["mot"].get("fid"),
            "transfusion_equal_steps_mot_all_correct": results["transfusion-equal_steps"]["variants"]["mot"].get(
                "align_all_correct"),
            "steps": args.steps, "transfusion_equal_flops_steps": equal_flops, "out": str(out)}
    print(json.dumps(line))


if __name__ == "__main__":
    main()
