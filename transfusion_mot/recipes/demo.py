"""`tmot demo`: the whole system on the embedded shapes data, on a 2-core CPU, in 4-9 minutes (by CPU kind).

Stages (each reuses its output when it is already complete, so a re-run only does what is missing):
  1. shapes images (train/val) -> the tiny VAE shipped for them (or one trained here, `vae_steps`) -> latent
     caches of both splits, and a BPE tokenizer of the training captions        (recipes.prepare)
  2. a tiny MoT trained with configs/train/shapes-tiny.yaml, with held-out losses on fixed draws
                                                                                  (recipes.train)
  3. samples for the demo prompts (every colour x shape) and for prompts the recipe was not tuned on
     (small objects, positions, two objects with a relation; other seeds)       (inference.pipeline)
  4. the shipped shapes classifier (a GenEval in miniature; or one trained here, `classifier_steps`) scores
     colour, shape, size, position                                                (eval.align)
  5. FID of generated images against the validation split, when Inception weights can be found (eval.fid)
Writes OUT/report.md (with the samples grid and the loss curves), OUT/report.json, OUT/samples.png,
OUT/curves.png.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..common.compile import describe_counts
from ..common.device import cpu_description, cpu_summary
from ..common.errors import ConfigError
from ..common.images import image_grid
from ..data.imageio import save_images
from ..data.shapes import COLOURS, POSITIONS, RELATIONS, SHAPES, SIZES, make_caption

# the prompts the demo shows (and the recipe was chosen on): every colour x shape, large, no position
DEMO_PROMPTS = [f"a large {colour} {shape}" for colour in COLOURS for shape in SHAPES]
RELATION_PROMPTS = ["a large red circle above a large blue square", "a large yellow triangle below a large green circle",
                    "a large white cross to the left of a large purple square",
                    "a large cyan square to the right of a large orange triangle"]
HELDOUT_SEED_OFFSET = 10_000  # held-out prompts are sampled with other seeds than the demo prompts
HELDOUT_IMAGES_PER_PROMPT = 2  # 64 images per held-out set: a standard error of about 6 points at 50%
DEMO_SET = "demo prompts (every colour x shape)"


def positioned_and_pair_prompts(rng: random.Random, n: int) -> tuple[list[str], list[str]]:
    """n single objects with a position phrase, then n pairs of different objects with a relation, drawn from
    `rng` (random size, colour and shape each)."""

    def obj() -> dict[str, str]:
        return {"size": rng.choice(list(SIZES)), "colour": rng.choice(list(COLOURS)), "shape": rng.choice(SHAPES)}

    positioned = [make_caption([obj()], position=rng.choice(list(POSITIONS))) for _ in range(n)]
    pairs: list[str] = []
    while len(pairs) < n:
        a, b = obj(), obj()
        if (a["colour"], a["shape"]) != (b["colour"], b["shape"]):
            pairs.append(make_caption([a, b], relation=rng.choice(RELATIONS)))
    return positioned, pairs


def heldout_prompts(n: int = 32, seed: int = 1) -> dict[str, list[str]]:
    """Prompt sets the demo's recipe was NOT tuned on: the other size of every colour x shape, single
    objects with a position phrase, two objects with a relation (drawn with a fixed seed), and the demo
    prompts again with other seeds."""
    small = [f"a small {colour} {shape}" for colour in COLOURS for shape in SHAPES]
    positioned, pairs = positioned_and_pair_prompts(random.Random(f"heldout:{seed}"), n)
    # the demo prompts themselves come last (so the other sets keep their seeds): held out by their seeds only
    return {"small objects": small, "single object with a position": positioned, "two objects with a relation": pairs,
            "demo prompts, other seeds": list(DEMO_PROMPTS)}


def prompt_sets(seed: int, images_per_prompt: int = 4,
                heldout_images_per_prompt: int = HELDOUT_IMAGES_PER_PROMPT) -> dict[str, tuple[list[str], list[int]]]:
    """name -> (prompts, one seed per image): the demo prompts with seeds seed, seed + 1, ..., then the held-out
    sets (`heldout_prompts`) with seeds from seed + HELDOUT_SEED_OFFSET on, so no two images share a seed."""
    demo = [p for p in DEMO_PROMPTS for _ in range(images_per_prompt)]
    sets = {DEMO_SET: (demo, [seed + k for k in range(len(demo))])}
    offset = seed + HELDOUT_SEED_OFFSET
    for name, prompts in heldout_prompts(seed=seed + 1).items():
        prompts = [p for p in prompts for _ in range(heldout_images_per_prompt)]
        sets[f"held out: {name}"] = (prompts, [offset + k for k in range(len(prompts))])
        offset += len(prompts)
    return sets


# compiling the blocks (train.compile) costs ~30 s once on a 2-core CPU and saves ~20% of each step (~35 ms):
# it pays from about 1,000 steps on
COMPILE_FROM_STEPS = 1000


def demo_config(steps: int | None, seed: int, progress: bool, eval_every: int | None, num_images: int,
                vae_steps: int | None):
    """configs/train/shapes-tiny.yaml (the recipe) with the demo's length (None: the recipe's), seed and data
    size, held-out losses `eval_every` steps (None or 0: ten times a run), its blocks compiled when the run is
    long enough for that to pay; `vae_steps` None: the recipe's VAE (the shipped one), else a VAE trained for
    that many steps."""
    from ..config import load_run_config

    vae = [] if vae_steps is None else ["data.builtin_vae=train", f"data.builtin_vae_steps={vae_steps}"]
    length = [] if steps is None else [f"train.max_steps={steps}"]
    config = load_run_config("shapes-tiny", [
        *length, f"train.seed={seed}", f"train.progress={str(progress).lower()}",
        f"data.builtin_num_images={num_images}", *vae])
    train = config.train
    train.save_every, train.compile = train.max_steps, train.max_steps >= COMPILE_FROM_STEPS
    train.eval_every = eval_every or max(1, train.max_steps // 10)
    return config


def _stage(report: dict[str, Any], name: str, start: float, log, **extra: Any) -> None:
    seconds = round(time.perf_counter() - start, 1)
    report["stages"][name] = {"seconds": seconds, **extra}
    log(f"[demo] {name}: {seconds:.1f} s" + (f" ({', '.join(f'{k}={v}' for k, v in extra.items())})" if extra else ""))


def run_demo(out: str | Path = "tmot_demo", *, num_images: int = 20000, vae_steps: int | None = None,
             train_steps: int | None = None, classifier_steps: int | None = None, images_per_prompt: int = 4,
             sample_steps: int = 50, scheduler: str | None = None, cfg_scale: float = 5.0,
             guidance_rescale: float = 0.7, fid_images: int = 100, eval_every: int | None = None, seed: int = 0,
             progress: bool = True, log=print) -> dict[str, Any]:
    """Run (or finish) the demo in `out`; returns the report dict (also written to report.json).

    train_steps None trains the recipe's (configs/train/shapes-tiny.yaml) steps. vae_steps / classifier_steps None
    use the VAE and the shapes classifier shipped with the package; a number trains one here for that many steps.
    scheduler None samples with the objective's own (flow for flow models, ddpm for ddpm ones). CFG 5 with
    guidance rescale 0.7 (the paper's value): plain CFG 5 draws oranges too light, and the rescale held or
    raised every validation set over three seeds (BENCHMARKS.md, "Guidance rescale")."""
    from ..inference.pipeline import Pipeline
    from ..run_dir import RunDir

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    config = demo_config(train_steps, seed, progress, eval_every, num_images, vae_steps)
    report: dict[str, Any] = {"machine": cpu_description(),  # the time depends on it: ~2x between machine kinds
                              # vae_steps / classifier_steps None: the ones shipped with the package
                              "settings": {"num_images": num_images, "vae_steps": vae_steps,
                                           "train_steps": config.train.max_steps,
                                           "classifier_steps": classifier_steps, "sample_steps": sample_steps,
                                           "scheduler": scheduler, "cfg_scale": cfg_scale,
                                           "guidance_rescale": guidance_rescale,
                                           "images_per_prompt": images_per_prompt, "fid_images": fid_images,
                                           "eval_every": config.train.eval_every, "seed": seed},
                              "stages": {}}
    prepared = _prepare_stage(report, config, out, progress, log)
    run = RunDir(out / "run")
    _train_stage(report, config, run, out, log)
    pipe = Pipeline.from_run(run.path, device="cpu")
    sampling = dict(cfg_scale=cfg_scale, guidance_rescale=guidance_rescale, num_steps=sample_steps,
                    scheduler=scheduler, batch_size=64)
    sets, images = _sample_stage(report, pipe, out, seed, images_per_prompt, sampling, log)
    classifier_dir = _align_stage(report, pipe, sets, images, prepared.data_dir, out, classifier_steps, seed, log)
    t = time.perf_counter()
    report["fid"] = _fid(pipe, prepared.data_dir, fid_images, sampling, seed)
    _stage(report, "fid", t, log)
    report["total_seconds"] = round(time.perf_counter() - t_all, 1)
    report["outputs"] = {"report_md": str(out / "report.md"), "samples_png": str(out / "samples.png"),
                         "curves_png": str(out / "curves.png"), "samples_dir": str(out / "samples"),
                         "run": str(run.path), "vae": str(prepared.vae_dir), "data": str(prepared.data_dir),
                         "classifier": str(classifier_dir)}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(render_report(report))
    run.write_evaluation(evaluation_summary(report))  # what the model card of an export states
    return report


def _prepare_stage(report: dict[str, Any], config: Any, out: Path, progress: bool, log) -> Any:
    """1. data, VAE, latents, tokenizer (reused when complete)."""
    from .prepare import prepare_for_run

    t = time.perf_counter()
    prepared = prepare_for_run(config, root=out / "shapes-32", progress=progress, log=log)
    _stage(report, "data_vae_latents", t, log, reused=prepared.info["reused"], latents=prepared.info["latents"])
    return prepared


def _refuse_another_recipe(run: Any, config: Any, out: Path, steps_done: list[int]) -> None:
    """A run folder that another recipe trained (an older release's demo, or other flags) is refused, saying what
    differs, where the trainer would answer with its --resume message (which the demo's user never passed) or,
    past the steps asked, sample a longer run than the report would state."""
    from ..config import RESUMABLE_KEYS

    if not steps_done:
        return
    diff = run.load_config().differences(config, ignore=RESUMABLE_KEYS) if run.exists() else []
    if diff:
        what = f"its config differs in {diff}"
    elif max(steps_done) > config.train.max_steps:
        what = f"it trained {max(steps_done)} steps, more than the {config.train.max_steps} asked"
    else:
        return
    raise ConfigError(f"{run.path} holds a demo run of another recipe ({what}: an older release's demo, or other "
                      f"flags); choose another --out, or delete {out} to start over")


def _train_stage(report: dict[str, Any], config: Any, run: Any, out: Path, log) -> None:
    """2. the MoT, with held-out losses (continued where a stopped demo left it; reused when finished)."""
    from ..training.curves import TRAINING_PANELS, plot_curves
    from .train import train

    t = time.perf_counter()
    steps_done = [s for s, _ in run.checkpoints()]
    train_steps = config.train.max_steps
    _refuse_another_recipe(run, config, out, steps_done)
    reused = train_steps in steps_done
    if not reused and train(config, run.path, resume=bool(steps_done)).status != "completed":
        raise KeyboardInterrupt("training stopped on request; run `tmot demo` again to continue")  # checkpoint saved
    summary, metrics = run.read_summary(), run.read_metrics()
    steps = [m for m in metrics if "loss" in m]  # the step-0 record holds held-out losses only
    _stage(report, "train", t, log, reused=reused, steps=train_steps)
    last, window = metrics[-1], steps[-10:]
    report["train"] = {"run": str(run.path), "steps": train_steps, "parameters": summary["parameters"],
                       "final": {k: round(last[k], 4) for k in ("loss", "text_loss", "image_loss")},
                       "first": {k: round(steps[0][k], 4) for k in ("loss", "text_loss", "image_loss")},
                       "validation": {k: round(v, 4) for k, v in last.items() if k.startswith("val_")},
                       "train_time_s": round(summary.get("train_time_s", 0.0), 1),
                       "tokens_per_s": round(sum(m["tokens_per_s"] for m in window) / len(window), 1),
                       "compile": summary.get("compile")}  # None: trained eagerly
    plot_curves({"demo": metrics}, out / "curves.png", panels=TRAINING_PANELS,
                title=f"tmot demo: training and held-out losses ({train_steps} steps)")


def _sample_stage(report: dict[str, Any], pipe: Any, out: Path, seed: int, images_per_prompt: int,
                  sampling: dict[str, Any], log) -> tuple[dict[str, tuple[list[str], list[int]]], dict[str, list]]:
    """3. samples: the demo prompts (the grid), then held-out prompt sets with other seeds."""
    t = time.perf_counter()
    sets = prompt_sets(seed, images_per_prompt)
    images: dict[str, list[Image.Image]] = {name: pipe.generate(prompts, seed=seeds, **sampling)
                                             for name, (prompts, seeds) in sets.items()}
    rows, all_images = [], []
    for name, (prompts, seeds) in sets.items():
        rows += [{"prompt": prompt, "seed": s, "set": name} for prompt, s in zip(prompts, seeds)]
        all_images += images[name]
    rows = save_images(all_images, out / "samples", rows, manifest={
        "checkpoint": pipe.info["checkpoint"], "weights": pipe.info["weights"], "cfg": sampling["cfg_scale"],
        "guidance_rescale": sampling["guidance_rescale"],
        "steps": sampling["num_steps"], "scheduler": sampling["scheduler"] or pipe.info["objective"]})
    # the grid: one row per colour, shapes (x images per prompt) across; relation prompts last
    relation = pipe.generate(RELATION_PROMPTS, seed=seed, **sampling)
    grid = image_grid([im.resize((64, 64), resample=Image.NEAREST) for im in images[DEMO_SET] + relation],
                      cols=len(SHAPES) * images_per_prompt)
    grid.save(out / "samples.png")
    _stage(report, "sample", t, log, images=len(rows) + len(relation))
    return sets, images


def _align_stage(report: dict[str, Any], pipe: Any, sets: dict[str, tuple[list[str], list[int]]],
                 images: dict[str, list], data_dir: Path, out: Path, classifier_steps: int | None, seed: int,
                 log) -> Path:
    """4. alignment of every prompt set, of real validation images and of those through the VAE, judged by the
    shipped classifier (classifier_steps None) or by one trained here."""
    from eval.align import SHIPPED_CLASSIFIER_DIR, load_classifier, score_alignment, train_shapes_classifier

    t = time.perf_counter()
    classifier_dir = SHIPPED_CLASSIFIER_DIR if classifier_steps is None else out / "shapes-classifier"
    reused = classifier_steps is None or (classifier_dir / "config.json").is_file()
    if reused:
        classifier = load_classifier(classifier_dir)
    else:  # every core: the demo has the machine to itself here (the classifier's default of 1 thread is for
        # scoring beside other jobs)
        classifier = train_shapes_classifier(classifier_dir, image_size=32, steps=classifier_steps, seed=seed,
                                             threads=torch.get_num_threads())
    alignment = {name: _strip(score_alignment(classifier, images[name], prompts))
                 for name, (prompts, _) in sets.items()}
    real_val = _val_images(data_dir, 256)
    real_images, real_captions = [Image.open(p).convert("RGB") for p, _ in real_val], [c for _, c in real_val]
    alignment["real val images (reference)"] = _strip(score_alignment(classifier, real_images, real_captions))
    # the same images encoded and decoded by the VAE: what a perfect generator of latents could reach
    alignment["real val images through the VAE (ceiling)"] = _strip(score_alignment(
        classifier, pipe.decode(pipe.encode_images(real_images)), real_captions))
    report["alignment"] = alignment
    report["classifier_heldout"] = classifier.metrics.get("heldout")
    _stage(report, "align", t, log, classifier="shipped" if classifier_steps is None else
           f"{'reused' if reused else 'trained'} ({classifier_steps} steps)")
    return classifier_dir


def evaluation_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The demo's headline numbers, flat: alignment per prompt set (colour, shape, all correct), FID, and how
    the images they score were sampled."""
    summary: dict[str, Any] = {"source": "tmot demo"}
    for name, scores in report["alignment"].items():
        if "reference" in name or "ceiling" in name:
            continue
        for key in ("colour", "shape", "all_correct"):
            if scores.get(key) is not None:
                summary[f"alignment {name}: {key}"] = scores[key]
    fid = report.get("fid", {})
    if "fid" in fid:
        summary[f"FID ({fid['n_fake']} vs {fid['n_real']} val images)"] = fid["fid"]
    s = report["settings"]
    summary["sampling"] = (f"{s['sample_steps']} steps, CFG {s['cfg_scale']}"
                           f"{_rescale_note(s.get('guidance_rescale', 0.0))}, EMA weights")
    return summary


def _strip(scores: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in scores.items() if k not in ("classifier_metrics", "per_image")}


def _val_images(data_dir: Path, n: int) -> list[tuple[Path, str]]:
    from ..data.imageio import read_metadata

    rows = read_metadata(data_dir, "val")[:n]
    return [(data_dir / r["file_name"], r["text"]) for r in rows]


def _fid(pipe, data_dir: Path, n: int, sampling: dict[str, Any], seed: int) -> dict[str, Any]:
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
    fakes = pipe.generate([c for _, c in val], seed=seed + 100_000, **sampling)
    result = compute_fid([p for p, _ in val], fakes, kid=False)
    return {"fid": round(result["fid"], 2), "n_real": result["n_real"], "n_fake": result["n_fake"],
            "extractor_sha256": result.get("extractor_sha256"), "mode": result.get("mode"),
            "note": f"{n} images per side: a small-sample FID, biased upwards; compare runs at equal n only"}


def _rescale_note(phi: float) -> str:
    return f" with guidance rescale {phi}" if phi else ""


def _made_here(steps: int | None) -> str:
    return "shipped with the package" if steps is None else f"trained here ({steps} steps)"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _compile_note(counts: dict[str, int] | None) -> str:
    return f" ({describe_counts(counts)})." if counts else " (eager)."


def render_report(report: dict[str, Any]) -> str:
    tr, al, s = report["train"], report["alignment"], report["settings"]
    p = tr["parameters"]
    scheduler = s["scheduler"].upper() if s["scheduler"] else "the objective's own"
    lines = [
        "# tmot demo report", "",
        f"Tiny MoT ({p['total']:,} parameters; active per token: text {p['active_per_token']['text']:,}, "
        f"image {p['active_per_token']['image']:,}) trained {tr['steps']} steps on the built-in shapes data "
        f"({report['stages']['data_vae_latents']['latents']:,} training images, 32 px, tiny VAE -> 8x8x4 latents; "
        f"VAE {_made_here(s['vae_steps'])}, shapes classifier {_made_here(s['classifier_steps'])}). "
        f"Sampling: {s['sample_steps']} steps ({scheduler} scheduler), CFG {s['cfg_scale']}"
        f"{_rescale_note(s.get('guidance_rescale', 0.0))}, EMA weights. "
        f"Total {report['total_seconds'] / 60:.1f} min on {cpu_summary(report['machine'])}.", "",
        "![samples](samples.png)", "",
        f"Rows: colours; columns: shapes x {s['images_per_prompt']} seeds (\"a large red circle\", ...); "
        "last row: two objects with a relation.", "",
        "## Alignment (shapes classifier: a GenEval in miniature)", "",
        "| prompts | images | colour | shape | size | position | all correct |", "|---|---|---|---|---|---|---|"]
    for name, a in al.items():
        lines.append(f"| {name} | {a['n_scored']} | {_pct(a.get('colour'))} | {_pct(a.get('shape'))} | "
                     f"{_pct(a.get('size'))} | {_pct(a.get('position'))} | {_pct(a.get('all_correct'))} |")
    held = report.get("classifier_heldout") or {}
    if held:
        lines += ["", "Classifier accuracy on held-out renders: " +
                  ", ".join(f"{k} {_pct(v)}" for k, v in held.items() if isinstance(v, float) and k != "center_error_px")]
    fid = report["fid"]
    val = tr["validation"]
    lines += ["", "## FID", "",
              (f"FID {fid['fid']} ({fid['n_fake']} generated vs {fid['n_real']} validation images, clean-fid protocol, "
               f"Inception sha256 {str(fid.get('extractor_sha256'))[:12]}...; {fid['note']})")
              if "fid" in fid else f"skipped: {fid['skipped']}",
              "", "## Training", "", "![curves](curves.png)", "",
              f"loss {tr['first']['loss']} -> {tr['final']['loss']} (text {tr['first']['text_loss']} -> "
              f"{tr['final']['text_loss']}, image {tr['first']['image_loss']} -> {tr['final']['image_loss']}); "
              f"{tr['tokens_per_s']:,.0f} tokens/s at the end, {tr['train_time_s']} s in training steps" +
              _compile_note(tr.get("compile"))]
    if val:
        lines += ["", "Held-out (fixed timesteps and noise): " + ", ".join(f"{k} {v}" for k, v in val.items())]
    lines += ["", "## Stages", "", "| stage | seconds | |", "|---|---|---|"]
    for name, st in report["stages"].items():
        extra = ", ".join(f"{k}={v}" for k, v in st.items() if k != "seconds")
        lines.append(f"| {name} | {st['seconds']} | {extra} |")
    o = report["outputs"]
    lines += ["", "## Where things are", "", f"- samples grid: `{o['samples_png']}`, loss curves: `{o['curves_png']}`",
              f"- samples and manifest (prompt, seed, set of every image): `{o['samples_dir']}`",
              f"- training run: `{o['run']}` (metrics, summary, checkpoints)", f"- VAE: `{o['vae']}`",
              f"- data: `{o['data']}`", f"- shapes classifier: `{o['classifier']}`", ""]
    return "\n".join(lines)
