"""`tmot demo`: the whole system on the embedded shapes data, on a CPU, in about ten minutes.

Stages (each reuses its output when it is already complete, so a re-run only does what is missing):
  1. shapes images (train/val) -> a tiny VAE -> the train split's latent cache   (transfusion_mot.prepare)
  2. a tiny MoT trained with configs/train/shapes-tiny.yaml                       (transfusion_mot.train)
  3. samples for fixed prompts (every colour x shape), classifier-free guidance  (transfusion_mot.pipeline)
  4. the shapes classifier (a GenEval in miniature) scores colour/shape/position  (eval.align)
  5. FID of generated images against the validation split, when Inception weights can be found (eval.fid)
Writes OUT/report.md, OUT/report.json and OUT/samples.png.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .data.shapes import COLOURS, SHAPES

DEMO_PROMPTS = [f"a large {colour} {shape}" for colour in COLOURS for shape in SHAPES]
RELATION_PROMPTS = ["a large red circle above a large blue square", "a large yellow triangle below a large green circle",
                    "a large white cross to the left of a large purple square",
                    "a large cyan square to the right of a large orange triangle"]


def _train_config(latents: Path, vae: Path, steps: int, seed: int, progress: bool):
    from .prepare import CONFIG_ROOT
    from .run import load_run_config

    config = load_run_config(CONFIG_ROOT / "train" / "shapes-tiny.yaml",
                             [f"train.max_steps={steps}", f"train.seed={seed}", f"train.progress={str(progress).lower()}",
                              f"train.save_every={max(steps // 4, 1)}"])
    config.data.path, config.data.builtin = str(latents), None
    config.vae.path = str(vae)
    return config


def _stage(report: dict[str, Any], name: str, start: float, log, **extra: Any) -> None:
    seconds = round(time.perf_counter() - start, 1)
    report["stages"][name] = {"seconds": seconds, **extra}
    log(f"[demo] {name}: {seconds:.1f} s" + (f" ({', '.join(f'{k}={v}' for k, v in extra.items())})" if extra else ""))


def run_demo(out: str | Path = "tmot_demo", *, num_images: int = 20000, vae_steps: int = 300,
             train_steps: int = 1500, classifier_steps: int = 1000, images_per_prompt: int = 2,
             sample_steps: int = 50, scheduler: str = "ddim", cfg_scale: float = 3.0, fid_images: int = 200,
             seed: int = 0, progress: bool = True, log=print) -> dict[str, Any]:
    """Run (or finish) the demo in `out`; returns the report dict (also written to report.json)."""
    from eval.align import load_classifier, score_alignment, train_shapes_classifier

    from .checkpoint import list_checkpoints
    from .pipeline import Pipeline, image_grid
    from .prepare import prepare_builtin
    from .train import train

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    report: dict[str, Any] = {"machine": {"cpu": platform.processor() or platform.machine(),
                                          "threads": torch.get_num_threads()},
                              "settings": {"num_images": num_images, "vae_steps": vae_steps, "train_steps": train_steps,
                                           "classifier_steps": classifier_steps, "sample_steps": sample_steps, "scheduler": scheduler,
                                           "cfg_scale": cfg_scale, "images_per_prompt": images_per_prompt,
                                           "fid_images": fid_images, "seed": seed},
                              "stages": {}}

    # 1. data, VAE, latents
    t = time.perf_counter()
    prepared = prepare_builtin("shapes", out / "shapes-32", image_size=32, num_images=num_images, vae_steps=vae_steps,
                               seed=seed, progress=progress, log=log)
    _stage(report, "data_vae_latents", t, log, reused=prepared.info["reused"], latents=prepared.info["latents"])

    # 2. the MoT
    t = time.perf_counter()
    run = out / "run"
    done = [s for s, _ in list_checkpoints(run)]
    if train_steps in done:
        reused = True
    else:
        reused = False
        config = _train_config(prepared.latents_dir, prepared.vae_dir, train_steps, seed, progress)
        if train(config, run, resume=bool(done)).status != "completed":  # SIGTERM / Ctrl-C: checkpoint saved
            raise KeyboardInterrupt("training stopped on request; run `tmot demo` again to continue")
    summary = json.loads((run / "summary.json").read_text())
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = metrics[-1]
    _stage(report, "train", t, log, reused=reused, steps=train_steps)
    report["train"] = {"run": str(run), "steps": train_steps, "parameters": summary["parameters"],
                       "final": {k: round(last[k], 4) for k in ("loss", "text_loss", "image_loss")},
                       "first": {k: round(metrics[0][k], 4) for k in ("loss", "text_loss", "image_loss")},
                       "tokens_per_s": round(sum(m["tokens_per_s"] for m in metrics[-10:]) / min(10, len(metrics)), 1)}

    # 3. samples for the fixed prompts
    t = time.perf_counter()
    pipe = Pipeline.from_run(run, device="cpu")
    prompts = [p for p in DEMO_PROMPTS + RELATION_PROMPTS for _ in range(images_per_prompt)]
    seeds = [seed + k for k in range(len(prompts))]
    images = pipe.generate(prompts, seed=seeds, cfg_scale=cfg_scale, num_steps=sample_steps, scheduler=scheduler,
                           batch_size=32)
    sample_dir = out / "samples"
    sample_dir.mkdir(exist_ok=True)
    for k, image in enumerate(images):
        image.save(sample_dir / f"{k:05d}.png")
    (sample_dir / "manifest.json").write_text(json.dumps(
        {"checkpoint": pipe.info["checkpoint"], "weights": pipe.info["weights"], "cfg": cfg_scale, "steps": sample_steps,
         "scheduler": scheduler, "images": [{"file": f"{k:05d}.png", "prompt": p, "seed": s}
                                         for k, (p, s) in enumerate(zip(prompts, seeds))]}, indent=2))
    # the grid: one row per colour, shapes (x images per prompt) across; relation prompts last
    grid = image_grid([im.resize((64, 64), resample=0) for im in images],
                      cols=len(SHAPES) * images_per_prompt)
    grid.save(out / "samples.png")
    _stage(report, "sample", t, log, images=len(images))

    # 4. alignment
    t = time.perf_counter()
    classifier_dir = out / "shapes-classifier"
    if (classifier_dir / "config.json").is_file():
        classifier = load_classifier(classifier_dir)
        reused = True
    else:
        classifier = train_shapes_classifier(classifier_dir, image_size=32, steps=classifier_steps, seed=seed)
        reused = False
    n_single = len(DEMO_PROMPTS) * images_per_prompt
    single = score_alignment(classifier, images[:n_single], prompts[:n_single])
    relation = score_alignment(classifier, images[n_single:], prompts[n_single:])
    real_val = _val_images(prepared.data_dir, 256)
    reference = score_alignment(classifier, [Image.open(p).convert("RGB") for p, _ in real_val],
                                [c for _, c in real_val])
    report["alignment"] = {"demo_prompts": _strip(single), "relation_prompts": _strip(relation),
                           "real_val_images": _strip(reference),
                           "classifier_heldout": classifier.metrics.get("heldout")}
    _stage(report, "align", t, log, classifier_reused=reused)

    # 5. FID against the validation split
    t = time.perf_counter()
    report["fid"] = _fid(pipe, prepared.data_dir, fid_images, sample_steps, scheduler, cfg_scale, seed)
    _stage(report, "fid", t, log)

    report["total_seconds"] = round(time.perf_counter() - t_all, 1)
    report["outputs"] = {"report_md": str(out / "report.md"), "samples_png": str(out / "samples.png"),
                         "samples_dir": str(sample_dir), "run": str(run), "vae": str(prepared.vae_dir),
                         "data": str(prepared.data_dir), "classifier": str(classifier_dir)}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(render_report(report))
    return report


def _strip(scores: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in scores.items() if k not in ("classifier_metrics", "per_image")}


def _val_images(data_dir: Path, n: int) -> list[tuple[Path, str]]:
    from .data.imageio import read_metadata

    rows = read_metadata(data_dir, "val")[:n]
    return [(data_dir / r["file_name"], r["text"]) for r in rows]


def _fid(pipe, data_dir: Path, n: int, steps: int, scheduler: str, cfg_scale: float, seed: int) -> dict[str, Any]:
    """FID (clean-fid protocol) of n images generated from val captions against those n val images."""
    from eval.fid import compute_fid
    from eval.inception import resolve_inception_weights

    if n <= 0:
        return {"skipped": "disabled (--fid-images 0)"}
    try:
        resolve_inception_weights()
    except FileNotFoundError as err:
        return {"skipped": str(err)}
    val = _val_images(data_dir, n)
    fakes = pipe.generate([c for _, c in val], seed=seed + 100_000, cfg_scale=cfg_scale, num_steps=steps,
                          scheduler=scheduler, batch_size=32)
    result = compute_fid([p for p, _ in val], fakes, kid=False)
    return {"fid": round(result["fid"], 2), "n_real": result["n_real"], "n_fake": result["n_fake"],
            "extractor_sha256": result.get("extractor_sha256"), "mode": result.get("mode"),
            "note": f"{n} images per side: a small-sample FID, biased upwards; compare runs at equal n only"}


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def render_report(report: dict[str, Any]) -> str:
    tr, al, s = report["train"], report["alignment"], report["settings"]
    p = tr["parameters"]
    lines = [
        "# tmot demo report", "",
        f"Tiny MoT ({p['total']:,} parameters; active per token: text {p['active_per_token']['text']:,}, "
        f"image {p['active_per_token']['image']:,}) trained {tr['steps']} steps on the built-in shapes data "
        f"({report['stages']['data_vae_latents']['latents']:,} training images, 32 px, tiny VAE -> 8x8x4 latents). "
        f"Sampling: {s['sample_steps']} {s['scheduler'].upper()} steps, CFG {s['cfg_scale']}, EMA weights. "
        f"Total {report['total_seconds'] / 60:.1f} min on {report['machine']['threads']} CPU threads.", "",
        "## Alignment (shapes classifier: a GenEval in miniature)", "",
        "| prompts | images | colour | shape | size | position | all correct |", "|---|---|---|---|---|---|---|"]
    for name, key in (("demo prompts (every colour x shape)", "demo_prompts"),
                      ("two objects with a relation", "relation_prompts"), ("real val images (reference)", "real_val_images")):
        a = al[key]
        lines.append(f"| {name} | {a['n_scored']} | {_pct(a.get('colour'))} | {_pct(a.get('shape'))} | "
                     f"{_pct(a.get('size'))} | {_pct(a.get('position'))} | {_pct(a.get('all_correct'))} |")
    held = al.get("classifier_heldout") or {}
    if held:
        lines += ["", "Classifier accuracy on held-out renders: " +
                  ", ".join(f"{k} {_pct(v)}" for k, v in held.items() if isinstance(v, float) and k != "center_error_px")]
    fid = report["fid"]
    lines += ["", "## FID", "",
              (f"FID {fid['fid']} ({fid['n_fake']} generated vs {fid['n_real']} validation images, clean-fid protocol, "
               f"Inception sha256 {str(fid.get('extractor_sha256'))[:12]}...; {fid['note']})")
              if "fid" in fid else f"skipped: {fid['skipped']}",
              "", "## Training", "",
              f"loss {tr['first']['loss']} -> {tr['final']['loss']} (text {tr['first']['text_loss']} -> "
              f"{tr['final']['text_loss']}, image {tr['first']['image_loss']} -> {tr['final']['image_loss']}); "
              f"{tr['tokens_per_s']:,.0f} tokens/s at the end.", "",
              "## Stages", "", "| stage | seconds | |", "|---|---|---|"]
    for name, st in report["stages"].items():
        extra = ", ".join(f"{k}={v}" for k, v in st.items() if k != "seconds")
        lines.append(f"| {name} | {st['seconds']} | {extra} |")
    o = report["outputs"]
    lines += ["", "## Where things are", "", f"- samples grid: `{o['samples_png']}` (rows: colours; columns: shapes x "
              f"{s['images_per_prompt']} seeds; last row: relation prompts)", f"- samples and manifest: `{o['samples_dir']}`",
              f"- training run: `{o['run']}` (metrics.jsonl, summary.json, checkpoints)", f"- VAE: `{o['vae']}`",
              f"- data: `{o['data']}`", f"- shapes classifier: `{o['classifier']}`", ""]
    return "\n".join(lines)
