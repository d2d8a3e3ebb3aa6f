"""The benchmark runner: generate N images for N prompts, then every metric that applies.

Why one runner: numbers are only comparable when they come from the same prompts, seeds, image
files and metric code. ``run_bench`` writes the images (PNG, lossless, so anyone can recompute a
metric later), the prompts, ``report.json`` (every number with the feature networks, their weights'
sha256, the resize and the seeds that produced it), ``report.md`` and a sample grid. Metrics of one feature
space share one pass over the images (FID, KID and precision/recall in Inception features; FD-DINOv2 and
precision/recall in DINOv2's). A metric whose inputs are missing (no Inception weights, no DINOv2 network,
no CLIP model, no classifier, prompts that are not shapes captions) is recorded as skipped with the
reason, never silently dropped.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transfusion_mot.common.errors import InvalidInput
from transfusion_mot.common.files import write_jsonl
from transfusion_mot.common.images import image_grid, to_pil
from transfusion_mot.data.imageio import save_images, write_metadata

from .dinov2 import DEFAULT_DINOV2_MODEL
from .images import LazyImages, SkipCounter, list_images

GenerateFn = Callable[[list[str], int], list[Any]]


def _log(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def generate_images(generate: GenerateFn, prompts: Sequence[str], out_dir: str | os.PathLike, batch_size: int = 16,
                    seed: int = 0, quiet: bool = False) -> dict[str, Any]:
    """Write ``generate``'s images for ``prompts`` to ``out_dir/images`` with metadata.jsonl and
    prompts.jsonl. The batch starting at prompt ``i`` is generated with seed ``seed + i``."""
    out = Path(out_dir)
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start:start + batch_size])
        images = generate(batch, seed + start)
        if len(images) != len(batch):
            raise ValueError(f"generate returned {len(images)} images for {len(batch)} prompts")
        rows += save_images(images, out, [{"text": p, "split": "val", "index": start + k, "seed": seed + start}
                                          for k, p in enumerate(batch)],
                            name="images/{index:06d}.png", key="file_name", start=start)
        _log(f"bench: generated {min(start + batch_size, len(prompts))}/{len(prompts)} images", quiet)
    seconds = time.perf_counter() - t0
    write_metadata(out, rows)  # the image-folder contract: `tmot eval clip|align --images OUT` work on it
    write_jsonl(out / "prompts.jsonl", [{"index": r["index"], "text": r["text"], "seed": r["seed"],
                                         "file_name": r["file_name"]} for r in rows])
    return {"n": len(rows), "seconds": round(seconds, 2), "images_per_s": round(len(rows) / seconds, 3) if seconds else None,
            "paths": [str(out / r["file_name"]) for r in rows]}


@dataclass
class BenchSpec:
    """What a benchmark scores its images against and with; a metric whose inputs are missing is recorded as
    skipped, with the reason.

    The reference: `ref_stats` (one .npz or several, one per feature space; each says its space) or `real_dir`
    (folder or list of files). FID and KID in Inception features (`extractor`, or the weights found from
    `inception`); FD-DINOv2 with `dinov2_model` (timm name, hf-hub:ID, local-dir:PATH or a loaded
    FeatureExtractor; None: not computed); precision/recall/density/coverage with `prdc_k` neighbours in
    `prdc_features` (None: DINOv2 features when they were computed, else Inception's); CLIP score with
    `clip_model` (hub id, directory or loaded ClipBundle), and CMMD with it and real images; shapes alignment
    with `classifier` (directory or ShapesClassifier; None: the shipped one) for prompts that are shapes
    captions. Images are generated `batch_size` prompts at a time, the batch starting at prompt i with seed
    `seed` + i; KID's subsets are drawn with `seed`."""

    ref_stats: str | os.PathLike | Sequence[str | os.PathLike] | None = None
    real_dir: str | os.PathLike | Sequence[str] | None = None
    clip_model: Any = None
    classifier: Any = None
    inception: str | os.PathLike | None = None
    extractor: Any = None
    dinov2_model: Any = DEFAULT_DINOV2_MODEL
    prdc_features: str | None = None
    prdc_k: int = 5
    allow_download: bool = False
    batch_size: int = 16
    seed: int = 0
    device: str = "cpu"
    kid: bool = True
    grid_size: int = 64


def run_bench(generate: GenerateFn, prompts: Sequence[str], out_dir: str | os.PathLike, spec: BenchSpec | None = None,
              *, quiet: bool = False, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Generate one image per prompt into ``out_dir`` and compute every metric `spec` allows. Writes
    ``report.json``, ``report.md``, ``report.html`` (the numbers, the grid and every image with its prompt and,
    with a classifier, the per-attribute verdicts), ``samples.png``, ``images/``, ``prompts.jsonl``,
    ``metadata.jsonl``; returns the report."""
    spec = spec or BenchSpec()
    if not prompts:
        raise InvalidInput("no prompts to generate")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"n": len(prompts), "seed": spec.seed, "batch_size": spec.batch_size, **(extra or {})}
    real = spec.real_dir
    real_paths = (list_images(real) if isinstance(real, (str, os.PathLike)) else list(real)) if real else None
    spaces = prepare_feature_spaces(spec, real_paths)
    gen = generate_images(generate, prompts, out, spec.batch_size, spec.seed, quiet)
    report["generation"] = {"seconds": gen["seconds"], "images_per_s": gen["images_per_s"]}
    fakes = LazyImages(gen["paths"])
    report.update(_feature_metrics(spec, spaces, gen["paths"], quiet))
    report["clip"], report["cmmd"] = _clip_and_cmmd(spec, fakes, prompts, real_paths, quiet)
    report["align"], verdicts = _alignment(spec, fakes, prompts)
    report["summary"] = summarise(report)
    _write_reports(report, prompts, out, fakes, [Path(p).relative_to(out).as_posix() for p in gen["paths"]], verdicts,
                   spec.grid_size)
    _log(f"bench: report in {out / 'report.md'} and {out / 'report.html'}", quiet)
    return report


def _space_extractor(space: str, spec: BenchSpec) -> Any:
    """The network of a feature space as the spec names it; raises a UserError saying why it cannot be had."""
    from .features import FeatureExtractor, clip_space
    from .fid import load_feature_extractor, resolve_extractor

    if space == "inception":
        return resolve_extractor(spec.extractor, spec.inception, spec.device, spec.allow_download)
    if space == "dinov2":
        if isinstance(spec.dinov2_model, FeatureExtractor):
            return spec.dinov2_model
        return load_feature_extractor("dinov2", spec.dinov2_model, spec.device, spec.allow_download)
    from .clip import ClipBundle, load_clip

    if spec.clip_model is None:
        raise InvalidInput("no CLIP model given")
    bundle = spec.clip_model if isinstance(spec.clip_model, ClipBundle) else load_clip(spec.clip_model, spec.device)
    return clip_space(bundle)


@dataclass
class FeatureSpaces:
    """What the benchmark measures in feature spaces, settled before any image is generated: per space, its
    network and reference (a statistics file or the real images), or why it is skipped."""

    extractors: dict[str, Any]
    references: dict[str, Any]  # loaded statistics (FeatureStats) or the real image paths
    reference_names: dict[str, str]  # what each row says it was compared with
    skipped: dict[str, str]
    prdc_space: str


def prepare_feature_spaces(spec: BenchSpec, real_paths: list[str] | None) -> FeatureSpaces:
    """Load the networks and check the references first, so that a mistake (two statistics files of one space,
    statistics of a space not computed, or made with other weights) fails before the images, not after them."""
    from transfusion_mot.common.errors import UserError

    from .features import check_space
    from .fid import FeatureStats, reference_stats_by_space

    if spec.prdc_features is not None:
        check_space(spec.prdc_features)
    if spec.dinov2_model is None and spec.prdc_features == "dinov2":
        raise InvalidInput("precision/recall in DINOv2 features need a DINOv2 network: drop --no-dinov2 "
                           "(dinov2_model=None) or choose other --prdc-features")
    wanted = ["inception"] + (["dinov2"] if spec.dinov2_model is not None else [])
    if spec.prdc_features is not None and spec.prdc_features not in wanted:
        wanted.append(spec.prdc_features)
    by_space = reference_stats_by_space(spec.ref_stats)
    unused = sorted(set(by_space) - set(wanted))
    if unused:
        raise InvalidInput(f"reference statistics of {', '.join(unused)} features ({by_space[unused[0]]}), which this "
                           "benchmark does not compute")
    spaces = FeatureSpaces({}, {}, {}, {}, spec.prdc_features or "")
    for space in wanted:
        if space not in by_space and real_paths is None:
            spaces.skipped[space] = f"no reference: pass real images (real_dir) or {space} statistics (ref_stats)"
            continue
        try:
            extractor = _space_extractor(space, spec)
        except UserError as err:  # no network here (not in the cache, no Inception file, no CLIP model)
            spaces.skipped[space] = str(err)
            continue
        if space in by_space:  # read once: checked here, compared after the images
            reference = FeatureStats.load(by_space[space])
            reference.check_compatible(extractor, what=f"the {space} reference statistics")
            spaces.reference_names[space] = str(by_space[space])
        else:
            reference = real_paths
        spaces.extractors[space], spaces.references[space] = extractor, reference
    if not spaces.prdc_space:
        spaces.prdc_space = "dinov2" if "dinov2" in spaces.extractors else "inception"
    return spaces


def _feature_metrics(spec: BenchSpec, spaces: FeatureSpaces, fakes: list[str], quiet: bool) -> dict[str, Any]:
    """FID/KID, FD-DINOv2 and precision/recall/density/coverage: one feature pass per space and side."""
    from transfusion_mot.common.errors import UserError

    from .fid import distances, small_n_note, stats_of
    from .prdc import prdc_note, prdc_of_stats

    stats: dict[str, tuple[Any, Any]] = {}
    skipped = dict(spaces.skipped)
    described: dict[str, Any] = {}
    for space, extractor in spaces.extractors.items():
        reference = spaces.references[space]
        try:
            _log(f"bench: {space} features ...", quiet)
            real_stats, real_report = stats_of(reference, extractor, 32, spec.device, what="real")
            fake_stats, fake_report = stats_of(fakes, extractor, 32, spec.device, what="fake")
        except UserError as err:  # too few readable images
            skipped[space] = str(err)
            continue
        stats[space] = (real_stats, fake_stats)
        described[space] = {**extractor.describe(), "n_real": real_stats.n, "n_fake": fake_stats.n,
                            "reference": spaces.reference_names.get(space, real_report["source"]),
                            "skipped_real": real_report.get("skipped", {}).get("count", 0),
                            "skipped_fake": fake_report.get("skipped", {}).get("count", 0),
                            "real": real_report, "fake": fake_report}

    def distance(space: str, kid: bool) -> dict[str, Any]:
        if space not in stats:
            return {"skipped": skipped[space]}
        real_stats, fake_stats = stats[space]
        return {**distances(real_stats, fake_stats, kid=kid, seed=spec.seed), **described[space],
                "small_n": small_n_note(space)}

    result: dict[str, Any] = {"fid": distance("inception", spec.kid)}
    if spec.dinov2_model is not None:
        result["fd_dinov2"] = distance("dinov2", False)
    else:
        result["fd_dinov2"] = {"skipped": "no DINOv2 network asked for (dinov2_model=None)"}
    prdc_space = spaces.prdc_space
    if prdc_space in stats:
        real_stats, fake_stats = stats[prdc_space]
        _log(f"bench: precision/recall in {prdc_space} features ...", quiet)
        try:
            result["prdc"] = {**prdc_of_stats(real_stats, fake_stats, spec.prdc_k, spec.device),
                              **described[prdc_space], "note": prdc_note(spec.prdc_k)}
        except UserError as err:  # fewer images than k + 1
            result["prdc"] = {"skipped": str(err)}
    else:
        result["prdc"] = {"skipped": skipped.get(prdc_space, f"no {prdc_space} features")}
    return result


def _clip_and_cmmd(spec: BenchSpec, fakes: LazyImages, prompts: Sequence[str], real_paths: list[str] | None,
                   quiet: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    if spec.clip_model is None:
        return {"skipped": "no CLIP model given"}, {"skipped": "no CLIP model given"}
    from .clip import ClipBundle, clip_score, load_clip
    from .cmmd import compute_cmmd

    bundle = spec.clip_model if isinstance(spec.clip_model, ClipBundle) else load_clip(spec.clip_model, spec.device)
    _log("bench: CLIP score ...", quiet)
    clip = clip_score(bundle, fakes, list(prompts))
    if not real_paths:
        return clip, {"skipped": "no real images (real_dir) to compare with"}
    _log("bench: CMMD ...", quiet)
    skipped = SkipCounter()
    cmmd = compute_cmmd(bundle, LazyImages(real_paths, skipped), fakes)
    cmmd["skipped_real"] = skipped.total
    return clip, cmmd


def _alignment(spec: BenchSpec, fakes: LazyImages, prompts: Sequence[str]) -> tuple[dict[str, Any], list[dict]]:
    from .align import score_alignment

    result = score_alignment(spec.classifier, fakes, list(prompts), details=True)  # None: the shipped judge
    verdicts = result.pop("per_image", [])
    return (result if result["n_scored"] else {"skipped": "no prompt is a shapes caption"}), verdicts


def _write_reports(report: dict[str, Any], prompts: Sequence[str], out: Path, fakes: LazyImages,
                   image_files: list[str], verdicts: list[dict[str, Any]], grid_size: int) -> None:
    grid = image_grid([fakes[i] for i in range(min(grid_size, len(fakes)))], cell=max(64, to_pil(fakes[0]).size[0]),
                      background=(16, 16, 16))
    grid.save(out / "samples.png")
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "report.md").write_text(render_markdown(report, prompts))
    (out / "report.html").write_text(render_html(report, prompts, image_files, verdicts))


PRDC_KEYS = ("precision", "recall", "density", "coverage")


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers (None where a metric was skipped)."""
    def get(section: str, key: str) -> Any:
        value = report.get(section, {})
        return value.get(key) if isinstance(value, dict) else None

    return {"fid": get("fid", "fid"), "kid": get("fid", "kid"), "fd_dinov2": get("fd_dinov2", "fd"),
            **{key: get("prdc", key) for key in PRDC_KEYS}, "clip_score": get("clip", "clip_score"),
            "cmmd": get("cmmd", "cmmd"), "align_all_correct": get("align", "all_correct")}


def _fmt(value: Any, digits: int = 4) -> str:
    return "–" if value is None else (f"{value:.{digits}g}" if isinstance(value, float) else str(value))


def _distance(value: float) -> str:
    """A distance with three decimals, or three significant digits when it is small (a toy network's FD)."""
    return f"{value:.3f}" if abs(value) >= 0.1 else f"{value:.3g}"


def _network(section: dict[str, Any]) -> str:
    """Which network made a section's features, with its weights' sha256 and the resize."""
    return (f"{section['extractor']} (sha256 {str(section['extractor_sha256'])[:12]}…), {section['preprocessing']}")


def metric_rows(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(metric, value, notes) per line of the reports' table; skipped metrics say why."""
    rows: list[tuple[str, str, str]] = []
    fid = report.get("fid", {})
    if "skipped" in fid:
        rows.append(("FID", "–", f"skipped: {fid['skipped']}"))
    else:
        rows.append((f"FID (clean, {fid['n_fake']} vs {fid['n_real']})", _distance(fid["fid"]),
                     f"{_network(fid)}; reference {fid['reference']}; {fid['small_n']}"))
        kid = fid.get("kid_skipped") or f"clean-fid definition (unbiased in n), subsets drawn with seed {fid.get('kid_seed')}"
        rows.append(("KID", _fmt(fid.get("kid")), kid))
    fd = report.get("fd_dinov2", {})
    if "skipped" in fd:
        rows.append(("FD-DINOv2", "–", f"skipped: {fd['skipped']}"))
    elif fd:
        label = "FD-DINOv2" if "dinov2" in str(fd["extractor"]).lower() else f"FD ({fd['extractor']})"
        rows.append((f"{label} ({fd['n_fake']} vs {fd['n_real']})", _distance(fd["fd"]),
                     f"{_network(fd)}; reference {fd['reference']}; {fd['small_n']}"))
    prdc = report.get("prdc", {})
    if "skipped" in prdc:
        rows.append(("precision/recall/density/coverage", "–", f"skipped: {prdc['skipped']}"))
    elif prdc:
        for key in PRDC_KEYS:
            rows.append((f"{key} ({prdc['features']}, k={prdc['k']})", _fmt(prdc[key]),
                         f"{prdc['n_fake']} vs {prdc['n_real']}, reference {prdc['reference']}; {prdc['note']}"
                         if key == "precision"
                         else "same features and manifolds"))
    clip = report.get("clip", {})
    rows.append(("CLIP score (×100)", _fmt(clip.get("clip_score")),
                 f"skipped: {clip['skipped']}" if "skipped" in clip else f"model {clip['model']}"))
    cmmd = report.get("cmmd", {})
    rows.append(("CMMD", _fmt(cmmd.get("cmmd")),
                 f"skipped: {cmmd['skipped']}" if "skipped" in cmmd else f"model {cmmd['model']}, σ=10, ×1000"))
    align = report.get("align", {})
    if "skipped" in align:
        rows.append(("shapes alignment", "–", f"skipped: {align['skipped']}"))
    else:
        for key in ("all_correct", "count", "colour", "shape", "size", "position"):
            rows.append((f"alignment: {key}", _fmt(align.get(key)),
                         f"{align['n_scored']} scored prompts, classifier {align['classifier']}"))
        for task, value in align.get("by_task", {}).items():
            rows.append((f"alignment: {task}", _fmt(value["all_correct"]), f"all correct, {value['n']} prompts"))
    return rows


def render_markdown(report: dict[str, Any], prompts: Sequence[str]) -> str:
    lines = [f"# Benchmark: {report['n']} images", ""]
    if report.get("run"):
        lines += [f"Run: `{report['run']}`", ""]
    lines += [(f"Seed {report['seed']} (the batch starting at prompt i draws with seed {report['seed']} + i), batch size "
               f"{report['batch_size']}, generation {_fmt(report['generation']['images_per_s'])} images/s."), "",
              "| metric | value | notes |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in metric_rows(report)]
    lines += ["", "![samples](samples.png)", "", "First prompts:", ""]
    lines += [f"{i}. {p}" for i, p in enumerate(prompts[:8])]
    return "\n".join(lines) + "\n"


def render_html(report: dict[str, Any], prompts: Sequence[str], image_files: Sequence[str],
                verdicts: Sequence[dict[str, Any]] = ()) -> str:
    """report.html: the metrics table, the samples grid, and one row per image (thumbnail, prompt and, for
    shapes captions, the classifier's verdict per attribute and what it detected)."""
    from html import escape

    by_index = {v["index"]: v for v in verdicts}
    attrs = ("count", "colour", "shape", "size", "position", "all_correct")
    head = ("<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}img.t{width:64px;image-rendering:pixelated}"
            ".ok{color:#070}.no{color:#b00}</style>")
    html = [(f"<!doctype html><html><head><meta charset='utf-8'><title>Benchmark: {report['n']} images</title>{head}"
            "</head><body>"), f"<h1>Benchmark: {report['n']} images</h1>"]
    if report.get("run"):
        html.append(f"<p>Run: <code>{escape(str(report['run']))}</code></p>")
    html.append("<table><tr><th>metric</th><th>value</th><th>notes</th></tr>")
    html += [f"<tr><td>{escape(a)}</td><td>{escape(b)}</td><td>{escape(c)}</td></tr>" for a, b, c in metric_rows(report)]
    html += ["</table>", "<h2>Samples</h2>", "<img src='samples.png' alt='samples grid' style='max-width:100%'>",
             "<h2>Every image</h2>", "<table><tr><th>#</th><th>image</th><th>prompt</th>"
             + ("".join(f"<th>{a.replace('_', ' ')}</th>" for a in attrs) + "<th>detected</th>" if by_index else "")
             + "</tr>"]
    for i, (prompt, file) in enumerate(zip(prompts, image_files)):
        row = f"<tr><td>{i}</td><td><img class='t' src='{escape(file)}'></td><td>{escape(prompt)}</td>"
        if by_index:
            v = by_index.get(i)
            if v is None:
                row += f"<td colspan='{len(attrs) + 1}'>not a shapes caption</td>"
            else:
                for a in attrs:
                    mark = "–" if v[a] is None else ("<span class='ok'>✓</span>" if v[a] else "<span class='no'>✗</span>")
                    row += f"<td>{mark}</td>"
                found = ", ".join(f"{d['size']} {d['colour']} {d['shape']}" for d in v.get("detected", []))
                row += f"<td>{escape(found) or 'nothing'}</td>"
        html.append(row + "</tr>")
    html += ["</table>", "</body></html>"]
    return "\n".join(html) + "\n"
