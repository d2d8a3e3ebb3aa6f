"""MoT versus its dense baseline (and the MoT and Transfusion ablations) trained on real data.

Every variant is the same training config with one change (`tmot train --set ...`), so the variants share
the code path, the seed, the data order, the timesteps and noise of every step, and are scored on the same
held-out draws (`train.eval_every`: fixed timesteps and noise, see transfusion_mot/training/validation.py).
By default every expert starts as a copy of one draw (`--expert-init copy`, model.expert_init): built from
one seed, each MoT variant then computes exactly the dense model's function at step 0, so the comparison
differs only by the untying. `--seeds 0,1,2` repeats everything per seed and reports mean and spread:

    dense         model.untie=[]                  the Transfusion baseline
    ffn           model.untie=[ffn]               MoT ablation: only the FFN untied
    ffn_attn      model.untie=[ffn,attn]          FFN and attention projections untied
    mot           model.untie=[attn,ffn,norm]     the full Mixture-of-Transformers
    *_causal      + model.image_attention=causal  Transfusion's mask ablation (e.g. dense_causal, mot_causal)

Outputs in OUT: runs/VARIANT (ordinary run directories; a later benchmark into the same OUT reuses a run
trained by the same command from the same config, recorded in commands.json), curves.png (held-out text and
image loss against steps and against training time), results.md (the table), results.json; on shapes data
also each variant's alignment (the shapes classifier) and FID at equal n (`tmot eval bench` on validation captions). The last
stdout line is one JSON object with mot_/dense_val_image_loss, mot_/dense_val_text_loss, steps_ratio and
time_ratio: the first evaluated step (training time) at which MoT's held-out image loss is at or below
dense's final one, over dense's steps (time); null if never; and mot_/dense_best_val_image_loss (the lowest
evaluation: on small data sets the held-out loss can rise again, and the table flags it). With several seeds
these are means over the seeds, with `*_std` and `*_per_seed` beside them.

    python benchmarks/mot_vs_dense.py --data shapes --steps 3000
    python benchmarks/mot_vs_dense.py --data shapes --steps 2000 --seeds 0,1,2 --jobs 2 --threads 1
    python benchmarks/mot_vs_dense.py --data shapes --steps 3000 --jobs 2 --threads 1 \\
        --variants mot,dense,ffn,ffn_attn,dense_causal,mot_causal
    python benchmarks/mot_vs_dense.py --data emoji --steps 2000 --jobs 2 --threads 1 \\
        --variants mot,dense,ffn,ffn_attn,dense_causal,mot_causal
    python benchmarks/mot_vs_dense.py --data shapes --steps 2000 --set model.dim=256 --set model.ffn_dim=688
    python benchmarks/mot_vs_dense.py --data LATENTS --val-data VAL_LATENTS --config my.yaml --steps 5000
    python benchmarks/mot_vs_dense.py --data IMAGE_FOLDER --vae VAE_DIR --config my.yaml --steps 5000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from transfusion_mot.run_dir import RunDir

REPO = Path(__file__).resolve().parents[1]
UNTIE = {"dense": "[]", "ffn": "[ffn]", "ffn_attn": "[ffn,attn]", "mot": "[attn,ffn,norm]"}
BUILTIN_CONFIGS = {"shapes": REPO / "configs/train/shapes-tiny.yaml", "emoji": REPO / "configs/train/emoji-tiny.yaml"}


def variant_overrides(name: str) -> list[str]:
    """`dense`, `ffn`, `ffn_attn`, `mot`, each optionally with `_causal`."""
    base, causal = (name[: -len("_causal")], True) if name.endswith("_causal") else (name, False)
    if base not in UNTIE:
        raise SystemExit(f"unknown variant {name!r}: use {', '.join(UNTIE)}, optionally with _causal")
    return [f"model.untie={UNTIE[base]}"] + (["model.image_attention=causal"] if causal else [])


def prepare_data(args: argparse.Namespace) -> dict[str, Any]:
    """Training data, held-out data, VAE and the config every variant starts from."""
    from transfusion_mot.config import load_run_config

    if args.data in BUILTIN_CONFIGS:
        from transfusion_mot.recipes.prepare import prepare_for_run

        config_path = Path(args.config or BUILTIN_CONFIGS[args.data])
        config = load_run_config(config_path, [*args.set, f"train.seed={args.seeds[0]}", f"data.builtin={args.data}"])
        prepared = prepare_for_run(config, progress=False)
        return {"config": config_path, "data": config.data.path, "val": config.data.val_path, "vae": config.vae.path,
                "images": str(prepared.data_dir), "shapes": args.data == "shapes"}
    path = Path(args.data)
    if not args.config:
        raise SystemExit("--config is required with your own data (e.g. configs/train/shapes-tiny.yaml)")
    if (path / "index.json").is_file():
        if not args.val_data:
            raise SystemExit("a latent cache needs --val-data: a cache of held-out images (tmot vae encode --split val)")
        index = json.loads((path / "index.json").read_text())
        images = index.get("data_dir")
        return {"config": Path(args.config), "data": str(path), "val": args.val_data, "vae": args.vae or index.get("vae"),
                "images": images, "shapes": _is_shapes(images)}
    if (path / "metadata.jsonl").is_file():
        if not args.vae:
            raise SystemExit("an image folder is encoded on the fly: pass --vae DIR_OR_HUB_ID")
        return {"config": Path(args.config), "data": str(path), "val": args.val_data, "vae": args.vae,
                "images": str(path), "shapes": _is_shapes(str(path))}
    raise SystemExit(f"--data {args.data}: not shapes, emoji, a latent cache (index.json) or an image folder")


def _is_shapes(images: str | None) -> bool:
    """An image folder written by `tmot data shapes` (its rows carry the objects the classifier checks)."""
    if not images or not (Path(images) / "metadata.jsonl").is_file():
        return False
    with open(Path(images) / "metadata.jsonl", encoding="utf-8") as f:
        first = json.loads(f.readline() or "{}")
    return "objects" in first


def run_name(name: str, seed: int, args: argparse.Namespace) -> str:
    """runs/VARIANT, or runs/VARIANT-sSEED with several seeds."""
    return name if len(args.seeds) == 1 else f"{name}-s{seed}"


_RECORDS_LOCK = threading.Lock()


def trained_from(out: Path) -> dict[str, Any]:
    """OUT/commands.json: for each finished run, the `tmot train` command and the config text it was trained
    from, so a later benchmark reuses a run only when it would train the same thing."""
    path = out / "commands.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def record_training(out: Path, run: str, recipe: dict[str, Any] | None) -> None:
    """Record what `run` was trained from (None: forget it, before it is trained again)."""
    with _RECORDS_LOCK:
        done = trained_from(out)
        if recipe is None:
            done.pop(run, None)
        else:
            done[run] = recipe
        tmp = out / f".commands-{os.getpid()}.tmp"
        tmp.write_text(json.dumps(done, indent=1) + "\n")
        tmp.replace(out / "commands.json")


def train_variant(name: str, seed: int, data: dict[str, Any], args: argparse.Namespace, out: Path) -> Path:
    run = out / "runs" / run_name(name, seed, args)
    cmd = [sys.executable, "-m", "transfusion_mot", "train", "--config", str(data["config"]), "--out", str(run),
           "--data", data["data"], "--max-steps", str(args.steps), "--eval-every", str(args.eval_every),
           "--no-progress", "--save-every", str(args.steps),
           "--set", f"train.seed={seed}", "--set", f"train.eval_samples={args.eval_samples}",
           "--set", f"model.expert_init={args.expert_init}",
           "--set", "train.tensorboard=false", "--set", "data.builtin=null"]
    if data["val"]:
        cmd += ["--val-data", data["val"]]
    if data["vae"]:
        cmd += ["--vae", data["vae"]]
    for override in [*args.set, *variant_overrides(name)]:
        cmd += ["--set", override]
    recipe = {"command": cmd[1:], "config": Path(data["config"]).read_text()}
    if RunDir(run).read_summary().get("step") == args.steps and trained_from(out).get(run.name) == recipe:
        return run  # trained earlier by the same command from the same config: reuse
    record_training(out, run.name, None)
    shutil.rmtree(run, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"training {name} failed:\n{proc.stderr[-3000:]}")
    record_training(out, run.name, recipe)
    print(f"[mot_vs_dense] {run.name}: {args.steps} steps in {time.perf_counter() - t0:.0f} s", file=sys.stderr,
          flush=True)
    return run


def reference_stats(images: str, out: Path, split: str = "val", limit: int | None = None) -> Path | None:
    """FID statistics of the data split's images (with `limit`, that many evenly spaced ones), computed once
    per benchmark (every variant and seed is scored against the same file instead of re-extracting the real
    images each time); None without Inception weights (the bench then reports FID as skipped)."""
    from eval.fid import save_reference_stats
    from eval.images import captioned_images
    from eval.inception import InceptionWeightsNotFound

    path = out / (f"reference-{split}.npz" if limit is None else f"reference-{split}-{limit}.npz")
    if not path.is_file():
        paths, _ = captioned_images(images, split=split)
        if limit is not None and limit < len(paths):
            paths = [paths[round(i * (len(paths) - 1) / max(1, limit - 1))] for i in range(limit)]
        try:
            save_reference_stats([str(p) for p in paths], path)
        except InceptionWeightsNotFound:
            return None
    return path


def bench_variant(run: Path, seed: int, data: dict[str, Any], args: argparse.Namespace,
                  classifier: Path | None, ref_stats: Path | None = None) -> dict[str, Any]:
    """Alignment and FID at equal n on validation captions, through `tmot eval bench` (same seeds for all);
    FID against `ref_stats` when given, else against the split's images. A finished bench of the same n and
    seed is reused (a re-run after a change to the tables does not generate again)."""
    done = run / "bench" / "report.json"
    if done.is_file():
        report = json.loads(done.read_text())
        if report.get("n") == args.bench_n and report.get("seed") == seed and "summary" in report:
            return bench_numbers(report, args.bench_n)
    cmd = [sys.executable, "-m", "transfusion_mot", "eval", "bench", "--run", str(run), "--data", data["images"],
           "--n", str(args.bench_n), "--seed", str(seed), "--json", "--device", "cpu", "--out", str(run / "bench")]
    if classifier is not None:
        cmd += ["--classifier", str(classifier)]
    if ref_stats is not None:
        cmd += ["--ref-stats", str(ref_stats)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"bench of {run} failed:\n{proc.stderr[-3000:]}")
    return bench_numbers(json.loads(proc.stdout)["report"], args.bench_n)


def bench_numbers(report: dict[str, Any], n: int) -> dict[str, Any]:
    align = report.get("align", {})
    return {"fid": report["summary"].get("fid"), "n": n,
            **{f"align_{k}": align.get(k) for k in ("colour", "shape", "size", "position", "all_correct")}}


def reach(records: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The first evaluation after training began whose held-out image loss is at or below `target`."""
    return next((r for r in records if r["step"] > 0 and "val_image_loss" in r and r["val_image_loss"] <= target),
                None)


AVERAGED = ("mot_val_image_loss", "dense_val_image_loss", "mot_val_text_loss", "dense_val_text_loss",
            "mot_best_val_image_loss", "dense_best_val_image_loss", "steps_ratio", "time_ratio")


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None for no values; 0 spread for one)."""
    if not values:
        return None, None
    mean = sum(values) / len(values)
    spread = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return mean, spread


def over_seeds(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Means and spreads over seeds of the headline numbers and of every variant's numbers. A ratio that is
    null for some seed (MoT never reached dense's final loss) is averaged over the others and counted."""
    out: dict[str, Any] = {}
    for key in AVERAGED:
        values = [r[key] for r in per_seed.values()]
        known = [v for v in values if v is not None]
        out[key], out[f"{key}_std"] = (round(v, 5) if v is not None else None for v in mean_std(known))
        out[f"{key}_per_seed"] = values
    variants: dict[str, Any] = {}
    for name in next(iter(per_seed.values()))["variants"]:
        rows = [r["variants"][name] for r in per_seed.values()]
        merged = dict(rows[0])
        for key, value in rows[0].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("params", "steps"):
                known = [row[key] for row in rows if row.get(key) is not None]
                merged[key], merged[f"{key}_std"] = mean_std(known)
        merged["reaches_dense_final_at_step"] = [row.get("reaches_dense_final_at_step") for row in rows]
        variants[name] = merged
    out["variants"] = variants
    out["seeds"] = list(per_seed)
    return out


def summarise(runs: dict[str, list[dict[str, Any]]], summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    final = {name: [r for r in records if "val_image_loss" in r][-1] for name, records in runs.items()}
    result: dict[str, Any] = {}
    for name in ("mot", "dense"):
        result[f"{name}_val_image_loss"] = final[name]["val_image_loss"] if name in final else None
        result[f"{name}_val_text_loss"] = final[name]["val_text_loss"] if name in final else None
    for name in ("mot", "dense"):
        best = min((r for r in runs.get(name, []) if "val_image_loss" in r), key=lambda r: r["val_image_loss"], default=None)
        result[f"{name}_best_val_image_loss"] = best["val_image_loss"] if best else None
    result["steps_ratio"] = result["time_ratio"] = None
    if "mot" in runs and "dense" in runs:
        dense_final = final["dense"]
        hit = reach(runs["mot"], dense_final["val_image_loss"])
        if hit is not None:
            result["steps_ratio"] = round(hit["step"] / dense_final["step"], 4)
            result["time_ratio"] = round(hit["train_time_s"] / dense_final["train_time_s"], 4)
    variants = {}
    for name, records in runs.items():
        params = summaries[name]["parameters"]
        f = final[name]
        best = min((r for r in records if "val_image_loss" in r), key=lambda r: r["val_image_loss"])
        variants[name] = {
            "untie": summaries[name]["model"]["untie"], "params": params["total"],
            "active_per_token": params["active_per_token"], "steps": f["step"],
            "train_time_s": round(f["train_time_s"], 1),
            "tokens_per_s": round(summaries[name]["tokens_seen"] / summaries[name]["train_time_s"], 1),
            "best_val_image_loss": round(best["val_image_loss"], 5), "best_step": best["step"],
            **{k: round(v, 5) for k, v in f.items() if k.startswith("val_")}}
        if "dense" in runs and name != "dense":
            hit = reach(records, final["dense"]["val_image_loss"])
            variants[name]["reaches_dense_final_at_step"] = hit["step"] if hit else None
    result["variants"] = variants
    return result


def render_table(result: dict[str, Any], title: str) -> str:
    lines = [f"### {title}", "",
             "| variant | untie | params | active/token (text, image) | val image loss | best (at step) | val text loss | "
             "val caption loss | reaches dense's final image loss at | tokens/s | train s | colour | shape | "
             "all correct | FID |", "|" + "---|" * 15]

    def pct(v: Any) -> str:
        return "–" if v is None else f"{100 * v:.1f}%"

    for name, v in result["variants"].items():
        act = v["active_per_token"]
        reach_at = v.get("reaches_dense_final_at_step", "–") if name != "dense" else "–"
        fid = v.get("fid")
        lines.append(
            f"| {name} | {','.join(v['untie']) or '-'} | {v['params']:,} | {act['text']:,}, {act['image']:,} | "
            f"{v['val_image_loss']:.4f} | {v['best_val_image_loss']:.4f} ({v['best_step']}) | {v['val_text_loss']:.4f} | {v['val_caption_loss']:.4f} | "
            f"{'never' if reach_at is None else reach_at} | {v['tokens_per_s']:,.0f} | {v['train_time_s']:.0f} | "
            f"{pct(v.get('align_colour'))} | {pct(v.get('align_shape'))} | {pct(v.get('align_all_correct'))} | "
            f"{'–' if fid is None else f'{fid:.1f}'} |")
    lines += ["", f"steps_ratio {result['steps_ratio']}, time_ratio {result['time_ratio']} (MoT's first evaluation at or "
              "below dense's final held-out image loss, over dense's steps / training time; null: never)."]
    rising = [name for name, v in result["variants"].items() if v["best_val_image_loss"] < 0.98 * v["val_image_loss"]]
    if rising:
        lines += ["", f"Held-out image loss rises after its best for {', '.join(rising)} (overfitting: the data is "
                  "small for this many steps); the ratios above compare against dense's final loss, so read the "
                  "best column too."]
    buckets = [k for k in next(iter(result["variants"].values())) if k.startswith("val_image_loss_t")]
    if buckets:
        lines += ["", "Held-out image loss per timestep quarter:", "",
                  "| variant | " + " | ".join(b[len("val_image_loss_"):] for b in buckets) + " |",
                  "|---|" + "---|" * len(buckets)]
        for name, v in result["variants"].items():
            lines.append(f"| {name} | " + " | ".join(f"{v[b]:.4f}" for b in buckets) + " |")
    return "\n".join(lines) + "\n"


def mean_sd_cell(v: dict[str, Any], key: str, fmt: str = ".4f", scale: float = 1.0) -> str:
    """A table cell "mean ± sd" of `key` (its spread under `key`_std), "–" when it was not measured."""
    if v.get(key) is None:
        return "–"
    return f"{scale * v[key]:{fmt}} ± {scale * (v.get(key + '_std') or 0.0):{fmt}}"


def render_seed_table(result: dict[str, Any], title: str) -> str:
    """Means ± sample standard deviations over the seeds, one row per variant."""
    seeds = result["seeds"]
    lines = [f"### {title}: mean ± sd over seeds {', '.join(map(str, seeds))}", "",
             "| variant | untie | params | val image loss | val caption loss | val text loss | reaches dense's final "
             "image loss at (per seed) | colour | shape | all correct | FID |", "|" + "---|" * 11]

    ms = mean_sd_cell
    for name, v in result["variants"].items():
        reach_at = ", ".join("never" if s is None else str(s) for s in v["reaches_dense_final_at_step"]) \
            if name != "dense" else "–"
        lines.append(f"| {name} | {','.join(v['untie']) or '-'} | {v['params']:,} | {ms(v, 'val_image_loss')} | "
                     f"{ms(v, 'val_caption_loss')} | {ms(v, 'val_text_loss')} | {reach_at} | "
                     f"{ms(v, 'align_colour', '.1f', 100)} | {ms(v, 'align_shape', '.1f', 100)} | "
                     f"{ms(v, 'align_all_correct', '.1f', 100)} | {ms(v, 'fid', '.1f')} |")
    lines += ["", f"steps_ratio {result['steps_ratio']} ± {result['steps_ratio_std']} (per seed: "
              f"{result['steps_ratio_per_seed']}), image loss MoT / dense "
              f"{result['mot_val_image_loss']} / {result['dense_val_image_loss']}."]
    return "\n".join(lines) + "\n"


def bench_all(args: argparse.Namespace, out: Path, data: dict[str, Any], run_dirs: dict, jobs: list
              ) -> dict[tuple[str, int], dict[str, Any]]:
    """FID and (on shapes data) alignment of every run, at equal n."""
    if args.bench_n <= 0 or not data["images"]:
        return {}
    classifier = None
    if data["shapes"]:
        classifier = out / "shapes-classifier"
        if not (classifier / "config.json").is_file():
            from eval.align import train_shapes_classifier

            train_shapes_classifier(classifier, image_size=32, steps=1000, seed=args.seeds[0])
    stats = reference_stats(data["images"], out)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        return dict(zip(jobs, pool.map(lambda job: bench_variant(run_dirs[job], job[1], data, args, classifier, stats),
                                       jobs)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="shapes", help="shapes | emoji | a latent cache | an image folder")
    ap.add_argument("--val-data", default=None, help="held-out latent cache (with a latent cache as --data)")
    ap.add_argument("--vae", default=None, help="VAE dir or hub id (with an image folder as --data)")
    ap.add_argument("--config", default=None, help="training config (default: the built-in data's tiny config)")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--eval-every", type=int, default=None, help="default: steps / 10")
    ap.add_argument("--eval-samples", type=int, default=512)
    ap.add_argument("--variants", default="mot,dense", help="comma-separated; see the module docstring")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="applies to every variant")
    ap.add_argument("--seeds", default="0", help="comma-separated training (and sampling) seeds, e.g. 0,1,2")
    ap.add_argument("--expert-init", choices=["copy", "random"], default="copy",
                    help="copy (default): every expert starts as one draw, MoT = dense at step 0; random: own draws")
    ap.add_argument("--jobs", type=int, default=1, help="variants trained at once (give each --threads cores)")
    ap.add_argument("--threads", type=int, default=max(1, torch.get_num_threads()), help="threads per training job")
    ap.add_argument("--bench-n", type=int, default=None,
                    help="images per variant for FID and alignment (default: 256 on shapes data, else 0)")
    ap.add_argument("--out", default="mot_vs_dense")
    args = ap.parse_args()
    args.eval_every = args.eval_every or max(1, args.steps // 10)
    try:
        args.seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--seeds {args.seeds!r}: comma-separated integers, e.g. 0,1,2") from None
    if not args.seeds:
        raise SystemExit("--seeds: give at least one seed")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    for name in names:
        variant_overrides(name)

    t0 = time.perf_counter()
    data = prepare_data(args)
    jobs = [(name, seed) for seed in args.seeds for name in names]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        run_dirs = dict(zip(jobs, pool.map(lambda job: train_variant(job[0], job[1], data, args, out), jobs)))

    from transfusion_mot.training.curves import plot_curves

    args.bench_n = args.bench_n if args.bench_n is not None else (256 if data["shapes"] else 0)
    benches = bench_all(args, out, data, run_dirs, jobs)
    per_seed = {}
    for seed in args.seeds:
        runs = {name: RunDir(run_dirs[name, seed]).read_metrics() for name in names}
        summaries = {name: RunDir(run_dirs[name, seed]).read_summary() for name in names}
        per_seed[seed] = summarise(runs, summaries)
        for name in names:
            per_seed[seed]["variants"][name].update(benches.get((name, seed), {}))
    result = per_seed[args.seeds[0]] if len(args.seeds) == 1 else {**over_seeds(per_seed), "per_seed": per_seed}

    title = (f"{args.data}: {args.steps} steps, evaluated every {args.eval_every} on {args.eval_samples} held-out "
             f"samples (fixed draws), experts {args.expert_init}")
    plot_curves({run.name: RunDir(run).read_metrics() for run in run_dirs.values()}, out / "curves.png", title=title)
    result.update({"data": args.data, "steps": args.steps, "eval_every": args.eval_every, "seeds": args.seeds,
                   "expert_init": args.expert_init, "overrides": args.set, "threads": args.threads, "jobs": args.jobs,
                   "machine": f"{platform.machine()}, {os.cpu_count()} cpus", "wall_s": round(time.perf_counter() - t0, 1),
                   "command": " ".join(["python benchmarks/mot_vs_dense.py", *sys.argv[1:]])})
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    tables = (render_table(result, title) if len(args.seeds) == 1 else
              render_seed_table(result, title) + "".join(
                  "\n" + render_table(per_seed[seed], f"seed {seed}") for seed in args.seeds))
    grids = [f"**{run.name}**\n\n![{run.name} samples](runs/{run.name}/bench/samples.png)\n"
             for run in run_dirs.values() if (run / "bench" / "samples.png").is_file()]  # what each variant drew
    samples = ("\n## Samples (same prompts and seeds)\n\n" + "\n".join(grids)) if grids else ""
    (out / "results.md").write_text(tables + f"\n![curves](curves.png)\n{samples}\n`{result['command']}`\n")
    print((out / "results.md").read_text())
    print(json.dumps({k: v for k, v in result.items() if k not in ("variants", "per_seed")} | {"out": str(out)}))


if __name__ == "__main__":
    main()
