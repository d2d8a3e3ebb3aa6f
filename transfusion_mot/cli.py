"""`tmot`: a thin command-line layer over the library. Each command maps to one library function."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .common.cli import COMPILE_HELP, Parser, fraction, non_negative_int, positive_int, run_command
from .common.errors import UserError


def print_json(obj: dict) -> None:
    print(json.dumps(obj, indent=2, default=str))


# --------------------------------------------------------------------------------------------------
# commands


def cmd_demo(args: argparse.Namespace) -> int:
    from .common.device import cpu_summary
    from .recipes.demo import run_demo

    given = {"train_steps": args.steps, "fid_images": args.fid_images, "num_images": args.num_images,
             "vae_steps": args.vae_steps, "classifier_steps": args.classifier_steps, "sample_steps": args.sample_steps}
    report = run_demo(args.out, seed=args.seed, progress=not args.no_progress,
                      **{k: v for k, v in given.items() if v is not None})
    out = Path(args.out)
    print((out / "report.md").read_text())
    print(f"tmot demo: done in {report['total_seconds'] / 60:.1f} min on {cpu_summary(report['machine'])}. Report: {out / 'report.md'} (and report.json); "
          f"samples: {out / 'samples.png'}; run: {out / 'run'}. Re-running reuses what is built.")
    print(f"Prompt the model in a browser: tmot serve --run {out / 'run'}   (then open http://127.0.0.1:7860)")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .accounting import describe_config

    report = describe_config(args.config, args.set, seq_len=args.seq_len, world_size=args.world_size)
    print(json.dumps(report, indent=None if args.json else 2))
    return 0


def cmd_data_shapes(args: argparse.Namespace) -> int:
    from .data.shapes import generate_shapes

    print_json(generate_shapes(args.out, num=args.num, size=args.size, seed=args.seed, val_fraction=args.val_fraction,
                               workers=args.workers))
    return 0


def cmd_data_emoji(args: argparse.Namespace) -> int:
    from .data.emoji import generate_emoji

    print_json(generate_emoji(args.out, size=args.size, font=args.font, val_fraction=args.val_fraction, seed=args.seed))
    return 0


def cmd_data_folder(args: argparse.Namespace) -> int:
    from .data.folder import import_folder

    print_json(import_folder(args.src, args.out, size=args.size, val_fraction=args.val_fraction, seed=args.seed,
                             max_pixels=args.max_pixels, min_side=args.min_side, workers=args.workers))
    return 0


def cmd_data_corpus(args: argparse.Namespace) -> int:
    from .data.corpus import build_corpus

    print_json(build_corpus(args.out, val_fraction=args.val_fraction, seed=args.seed, wordnet_dir=args.wordnet_dir))
    return 0


def cmd_data_tokenizer(args: argparse.Namespace) -> int:
    from .tokenizer import train_tokenizer_from_folder

    tok = train_tokenizer_from_folder(args.data, args.vocab_size, args.out)
    print_json({"tokenizer": str(args.out), "vocab_size_with_specials": tok.vocab_size})
    return 0


def cmd_vae_train(args: argparse.Namespace) -> int:
    from vae.train import train_vae

    from .common.config import resolve_config_path

    print_json(train_vae(resolve_config_path(args.config, "vae"), args.data, args.out, max_steps=args.max_steps, overrides=args.set,
                         resume=args.resume))
    return 0


def cmd_vae_encode(args: argparse.Namespace) -> int:
    from vae.latents import encode_folder

    print_json(encode_folder(args.vae, args.data, args.out, batch_size=args.batch_size, split=args.split))
    return 0


def cmd_vae_reconstruct(args: argparse.Namespace) -> int:
    from vae.reconstruct import reconstruct

    print_json(reconstruct(args.vae, args.data, args.out, n=args.n, split=args.split))
    return 0


def train_settings(args: argparse.Namespace) -> dict[str, object]:
    """The flags of `tmot train` that stand for config keys, as {key: value} (`--data PATH` also sets
    data.kind: auto, so the run tells what PATH holds)."""
    flags = {"data.path": args.data, "data.kind": "auto" if args.data else None, "vae.path": args.vae,
             "data.val_path": args.val_data, "train.eval_every": args.eval_every, "train.max_steps": args.max_steps,
             "train.save_every": args.save_every, "train.progress": False if args.no_progress else None}
    return {key: value for key, value in flags.items() if value is not None}


def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_run_config
    from .recipes.train import train
    from .run_dir import RunDir

    run = RunDir(args.out)
    if args.config is None and not (args.resume and run.exists()):
        raise UserError("--config is required (except with --resume in a run directory that has its config)")
    config = load_run_config(args.config or run.config_file, args.set, train_settings(args))
    result = train(config, run.path, resume=args.resume)
    if result.main:
        how = {"completed": "finished", "stopped": "stopped on request"}[result.status]
        print(f"tmot train: {how} at step {result.step}; checkpoint {result.checkpoint}; "
              f"metrics {run.metrics_file}; summary {run.summary_file}"
              + ("; continue with --resume" if result.status == "stopped" else ""))
    return 0


def read_prompts(args: argparse.Namespace) -> list[str]:
    """--prompt (repeatable) and/or --prompts FILE (.txt: one per line; .jsonl: "prompt" or "text")."""
    from .common.files import read_prompts as read_prompt_file

    prompts = list(args.prompt or [])
    if args.prompts:
        from_file = read_prompt_file(args.prompts)
        if not from_file:
            raise UserError(f"prompt file {args.prompts} has no prompts (it is empty)")
        prompts += from_file
    if not prompts:
        raise UserError("give a prompt: --prompt TEXT (repeatable) or --prompts FILE")
    return prompts


def cmd_sample(args: argparse.Namespace) -> int:
    from .common.compile import compile_counts, describe_counts
    from .inference.pipeline import load_pipeline

    prompts = read_prompts(args)
    pipe = load_pipeline(args.run, step=args.step, ema=not args.no_ema, device=args.device, compiled=args.compile)
    rows = pipe.sample_to_folder(prompts, args.out, n=args.n, seed=args.seed, cfg_scale=args.cfg,
                                 guidance_rescale=args.guidance_rescale, num_steps=args.steps,
                                 scheduler=args.scheduler, use_kv_cache=not args.no_kv_cache,
                                 batch_size=args.batch_size, temperature=args.temperature, top_k=args.top_k,
                                 top_p=args.top_p)
    compiled = f"; {describe_counts(compile_counts())}" if args.compile else ""
    print(f"tmot sample: {len(rows)} images in {args.out} (grid.png, manifest.json){compiled}")
    return 0


def cmd_caption(args: argparse.Namespace) -> int:
    from .inference.pipeline import load_pipeline

    pipe = load_pipeline(args.run, step=args.step, ema=not args.no_ema, device=args.device)
    captions = pipe.caption(args.images, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, seed=args.seed, use_kv_cache=not args.no_kv_cache)
    if args.json:
        print(json.dumps([{"image": p, "caption": c} for p, c in zip(args.images, captions)]))
    else:
        for path, caption in zip(args.images, captions):
            print(f"{path}\t{caption}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .inference.pipeline import Pipeline

    if not (args.out or args.text_lm):
        raise UserError("give --out (the pipeline directory) and/or --text-lm (the language model's text side)")
    if args.text_lm:
        from .run_dir import RunDir

        lm = RunDir(args.run).export_text_lm(args.text_lm, step=args.step, ema=not args.no_ema)
        print(f"tmot export: {lm}: the text side as a transformers model (AutoModelForCausalLM.from_pretrained"
              f"({str(lm)!r}), with its tokenizer)")
        if not args.out:
            return 0
    pipe = Pipeline.from_run(args.run, step=args.step, ema=not args.no_ema, device="cpu")
    out = pipe.save_pretrained(args.out, repo_id=args.push_to_hub)
    print(f"tmot export: {out} with its model card README.md (load with Pipeline.from_pretrained or tmot sample "
          f"--run {out})")
    if args.push_to_hub:
        from .inference.hub import push_to_hub

        url = push_to_hub(out, args.push_to_hub, private=args.private)
        print(f"tmot export: pushed to {url} (load with Pipeline.from_pretrained({args.push_to_hub!r}))")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .inference.app import serve

    serve(args.run, host=args.host, port=args.port, device=args.device, step=args.step, ema=not args.no_ema)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .training.curves import plot_runs

    out = plot_runs(args.runs, args.out, x=args.x)
    print(f"tmot plot: {out} ({len(args.runs)} runs)")
    return 0


def bench_loader(run: str, device: str, compiled: bool = False):
    """For `tmot eval bench` and `geneval-export`: a run or saved pipeline as a `generate(prompts, seed) -> images`
    callable, its blocks compiled with `compiled`."""
    from .inference.pipeline import load_pipeline

    pipe = load_pipeline(run, device=device, compiled=compiled)

    def generate(prompts: list[str], seed: int, **kwargs):
        return pipe.generate(prompts, seed=seed, **kwargs)

    return generate


# --------------------------------------------------------------------------------------------------
# parser


FORMAT = argparse.RawDescriptionHelpFormatter


def command(group: Any, name: str, help_: str, example: str, func: Callable[[argparse.Namespace], int],
            description: str | None = None) -> argparse.ArgumentParser:
    """A subcommand of `group` whose --help shows its description and an example."""
    p = group.add_parser(name, help=help_, description=description or help_, epilog=f"example:\n  {example}",
                         formatter_class=FORMAT)
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="tmot", description="Transfusion text-to-image models on a Mixture-of-Transformers backbone.",
        formatter_class=FORMAT,
        epilog="examples:\n  tmot demo --out tmot_demo\n  tmot data shapes --out data/shapes --num 20000 --size 32\n"
               "  tmot info --config configs/model/760m.yaml")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    add_demo_and_info(sub)
    add_train(sub)
    add_model_commands(sub)
    from eval.cli import register as register_eval

    register_eval(sub, bench_loader=bench_loader)
    add_data(sub)
    add_vae(sub)
    return parser


def add_demo_and_info(sub: Any) -> None:
    """`tmot demo` and `tmot info`."""
    p = command(sub, "demo", "the whole system on the embedded shapes data (4-9 minutes on 2 CPU cores, by CPU kind)",
                "tmot demo --out tmot_demo", cmd_demo,
                "Generate the shapes data, encode it with the tiny VAE shipped for it, train a tiny MoT, sample a grid "
                "for fixed prompts, score alignment with the shipped shapes classifier and FID against the validation "
                "split (when Inception weights are available); writes report.md, report.json and samples.png. "
                "Re-running reuses what is already built.")
    p.add_argument("--out", default="tmot_demo", help="output directory (default: tmot_demo)")
    p.add_argument("--steps", type=positive_int, default=None, help="MoT training steps (default: the recipe's, "
                   "configs/train/shapes-tiny.yaml: 3-7 minutes of training on 2 CPU cores, by CPU kind)")
    p.add_argument("--fid-images", type=non_negative_int, default=None, help="images per side for FID (default 100; "
                   "0: skip FID)")
    p.add_argument("--num-images", type=positive_int, default=None,
                   help="shapes images to generate (default 20000; fewer for a quick smoke run)")
    p.add_argument("--sample-steps", type=positive_int, default=None,
                   help="denoising steps per image (default 50; fewer for a quick smoke run: worse images)")
    p.add_argument("--vae-steps", type=positive_int, default=None,
                   help="train the tiny VAE here for N steps (default: use the VAE shipped for the shapes data)")
    p.add_argument("--classifier-steps", type=positive_int, default=None,
                   help="train the shapes classifier here for N steps (default: use the shipped one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")

    p = command(sub, "info", "parameter, FLOP and training-memory accounting of a model or training config",
                "tmot info --config configs/model/760m.yaml --set untie=[]", cmd_info,
                "Total, per-modality and active parameters per token, and training FLOPs per token "
                "(6N + attention), without allocating the weights. A training config (e.g. lmfusion-shapes "
                "--set model.init_from=Qwen/Qwen2.5-0.5B) adds the memory of weights, gradients, AdamW and EMA "
                "per process, with its train.freeze (activations not included).")
    p.add_argument("--config", required=True, help="model config (tiny, 163m, 760m, 1.4b, 7b) or training config "
                   "(shapes-tiny, lmfusion-shapes, ...): a YAML file or a shipped name")
    p.add_argument("--world-size", type=positive_int, default=1, help="processes the training state is sharded over")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--seq-len", type=positive_int, default=None, help="context for attention FLOPs (default: max_seq_len)")
    p.add_argument("--json", action="store_true", help="one-line JSON")


def add_train(sub: Any) -> None:
    """`tmot train`."""
    p = command(sub, "train", "train a Transfusion MoT model (one process, or torchrun + FSDP2)",
                "tmot train --config configs/train/shapes-tiny.yaml --out runs/shapes-tiny", cmd_train,
                "Train from a config (configs/train/*.yaml: model, tokenizer, data, vae, optim, train sections). "
                "Writes the run directory: its resolved config, metrics (JSONL and TensorBoard), summary and "
                "checkpoints. SIGTERM or Ctrl-C saves a checkpoint and exits; --resume continues "
                "exactly. Multi-process: torchrun --standalone --nproc_per_node N -m transfusion_mot train ...")
    p.add_argument("--config", default=None, help="training config: a YAML file or a shipped name (shapes-tiny, "
                   "emoji-tiny, coco-760m); optional with --resume")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--data", default=None, help="latent cache, image folder or WebDataset shards (sets data.path)")
    p.add_argument("--vae", default=None, help="VAE directory or hub id (sets vae.path)")
    p.add_argument("--val-data", default=None,
                   help="held-out data of the same kind as --data (sets data.val_path; a folder's own val split "
                        "is used by default)")
    p.add_argument("--eval-every", type=non_negative_int, default=None,
                   help="held-out losses every N steps on fixed draws (sets train.eval_every; 0: never)")
    p.add_argument("--max-steps", type=positive_int, default=None, help="sets train.max_steps")
    p.add_argument("--save-every", type=positive_int, default=None, help="sets train.save_every")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set optim.lr=3e-4 --set model.untie=[]")
    p.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the metrics are still logged)")


def add_model_commands(sub: Any) -> None:
    """What takes a trained model: `tmot sample`, `caption`, `export`, `serve`, `plot`."""
    def source_flags(p) -> None:
        p.add_argument("--run", required=True, help="run directory (tmot train --out) or a saved pipeline (tmot export)")
        p.add_argument("--step", type=positive_int, default=None, help="checkpoint step (default: the last)")
        p.add_argument("--no-ema", action="store_true", help="raw weights instead of the EMA weights")
        p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")

    p = command(sub, "sample", "generate images from prompts (classifier-free guidance, KV-cached caption)",
                'tmot sample --run runs/shapes-tiny --prompt "a large red circle" --n 4 --cfg 3 --steps 50 --out samples',
                cmd_sample,
                "Text -> image with a trained run: the caption's keys/values are computed once (KV cache) and each "
                "denoising step runs only the image tokens (a model of image tokens draws its codes one at a time "
                "instead, with --temperature/--top-k/--top-p); conditional and unconditional rows are batched "
                "together. Writes PATH/00000.png..., PATH/grid.png and PATH/manifest.json.")
    source_flags(p)
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", default=None, help="file of prompts: .txt one per line, or .jsonl with 'prompt'/'text'")
    p.add_argument("--n", type=positive_int, default=1, help="images per prompt")
    p.add_argument("--seed", type=int, default=0, help="image k uses seed + k")
    p.add_argument("--cfg", type=float, default=3.0, help="guidance scale in [0, 100] (1: no guidance)")
    p.add_argument("--guidance-rescale", type=float, default=0.0,
                   help="diffusion models with --cfg other than 1: in [0, 1], how far guidance's clean latent is "
                        "rescaled to the conditional one's spread (0: plain guidance; the demo samples with 0.7)")
    p.add_argument("--steps", type=positive_int, default=50, help="denoising steps (diffusion models)")
    p.add_argument("--scheduler", choices=["ddpm", "ddim", "flow"], default=None,
                   help="default: ddpm for DDPM models, flow for flow models")
    p.add_argument("--temperature", type=float, default=1.0, help="image tokens models: in [0, 10]; 0: greedy")
    p.add_argument("--top-k", type=positive_int, default=None, help="image tokens models: sample of the k likeliest codes")
    p.add_argument("--top-p", type=float, default=None, help="image tokens models: nucleus sampling, in (0, 1]")
    p.add_argument("--batch-size", type=positive_int, default=16, help="prompts per forward")
    p.add_argument("--no-kv-cache", action="store_true", help="re-run the caption every step (slow, exact; for checks)")
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    p.add_argument("--out", required=True, help="output directory")

    p = command(sub, "caption", "caption images with a trained run (image first, then causal text decoding)",
                "tmot caption --run runs/shapes-tiny img1.png img2.png", cmd_caption)
    source_flags(p)
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="in [0, 10]; 0: greedy")
    p.add_argument("--top-k", type=positive_int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-kv-cache", action="store_true")
    p.add_argument("--json", action="store_true")

    p = command(sub, "export", "save a run's model, tokenizer and VAE as a self-contained pipeline directory",
                "tmot export --run runs/shapes-tiny --out shapes-tiny-model [--push-to-hub ORG/NAME]", cmd_export,
                "A directory with one safetensors file of full weights (consolidated from a sharded checkpoint), "
                "the tokenizer, the VAE, pipeline.json and a model card (README.md with Hub metadata); "
                "--push-to-hub uploads it (huggingface-cli login first). For a run started from a language "
                "model (model.init_from), --text-lm DIR writes its text side back as a transformers model of "
                "that architecture (AutoModelForCausalLM.from_pretrained(DIR)).")
    source_flags(p)
    p.add_argument("--out", default=None, help="pipeline directory to write")
    p.add_argument("--text-lm", default=None, metavar="DIR",
                   help="also (or only) write the text side as a transformers causal LM with its tokenizer")
    p.add_argument("--push-to-hub", default=None, metavar="ORG/NAME", help="upload the directory to this Hub model repo")
    p.add_argument("--private", action="store_true", help="create the Hub repo private")

    p = command(sub, "serve", "a web page (Gradio) to prompt a model: text -> images, image -> caption, model card",
                "tmot serve --run runs/shapes-tiny  # then open http://127.0.0.1:7860", cmd_serve,
                "Serves a run directory, an exported directory or a Hub id. Binds to 127.0.0.1 unless --host says "
                "otherwise (0.0.0.0: every interface); requests run one at a time, with bounded sizes.")
    source_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: this machine only)")
    p.add_argument("--port", type=positive_int, default=7860)

    p = command(sub, "plot", "loss and learning-rate curves of one or more runs in one PNG",
                "tmot plot runs/mot runs/dense --out curves.png", cmd_plot,
                "Training and held-out image and text losses and the learning rate, against steps and training "
                "time, several runs overlaid with their directory names.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (their metrics)")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--x", choices=["step", "time", "both"], default="both", help="x axis (default: both panels)")


def add_data(sub: Any) -> None:
    """`tmot data shapes|emoji|folder|corpus|tokenizer`."""
    data = sub.add_parser("data", help="make or import image-caption data sets (image folder + metadata.jsonl)",
                          description="Make or import image-caption data sets. Every subcommand writes an image "
                                      "folder: DIR/metadata.jsonl (file_name, text, split, attributes) + PNGs.",
                          formatter_class=FORMAT, epilog="example:\n  tmot data shapes --out data/shapes --num 20000")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="SOURCE", parser_class=Parser)
    p = command(dsub, "shapes", "procedural captioned shapes (the embedded default data set)",
                "tmot data shapes --out data/shapes --num 20000 --size 32 --seed 0", cmd_data_shapes,
                "Coloured shapes with captions such as 'a small red circle above a blue square'; the "
                "structured attributes go to metadata.jsonl so generated images can be scored for alignment.")
    p.add_argument("--out", required=True)
    p.add_argument("--num", type=positive_int, default=20000)
    p.add_argument("--size", type=positive_int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=fraction, default=0.1)
    p.add_argument("--workers", type=positive_int, default=1, help="processes (output is identical for any number)")

    p = command(dsub, "emoji", "Noto Color Emoji rendered with captions from their Unicode names",
                "tmot data emoji --out data/emoji --size 32", cmd_data_emoji,
                "Renders the ~1,300 single-code-point emoji of Noto Color Emoji (Debian: apt-get install "
                "fonts-noto-color-emoji) on white, captioned with unicodedata.name.")
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=positive_int, default=32)
    p.add_argument("--font", default=None, help="path to NotoColorEmoji.ttf (default: the Debian location)")
    p.add_argument("--val-fraction", type=fraction, default=0.1)
    p.add_argument("--seed", type=int, default=0, help="salt of the train/val split")

    p = command(dsub, "folder", "import your own images with captions",
                "tmot data folder --src photos/ --out data/photos --size 64", cmd_data_folder,
                "Imports images with captions from SRC/metadata.jsonl, a CSV, or sidecar .txt files; converts "
                "to RGB, centre-crops and resizes; skips (and counts) corrupt, truncated, empty, huge and "
                "non-image files.")
    p.add_argument("--src", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=positive_int, default=64)
    p.add_argument("--val-fraction", type=fraction, default=0.1)
    p.add_argument("--seed", type=int, default=0, help="salt of the train/val split")
    p.add_argument("--max-pixels", type=positive_int, default=40_000_000, help="skip larger images (decompression bombs)")
    p.add_argument("--min-side", type=positive_int, default=1, help="skip images whose shorter side is smaller")
    p.add_argument("--workers", type=positive_int, default=1)

    p = command(dsub, "corpus", "an English text corpus, offline: WordNet's glosses as train/val documents",
                "tmot data corpus --out data/corpus", cmd_data_corpus,
                "Writes OUT/train.txt and OUT/val.txt (one document per line) and OUT/info.json from Debian's "
                "wordnet-base (apt-get install wordnet-base): text-only training documents (data.text_only_path), "
                "held-out documents for the corpus loss (data.text_val_path), or a language model's pretraining text.")
    p.add_argument("--out", required=True)
    p.add_argument("--val-fraction", type=fraction, default=0.02, help="documents held out (by a hash of their text)")
    p.add_argument("--seed", type=int, default=0, help="order of the training documents")
    p.add_argument("--wordnet-dir", default="/usr/share/wordnet", help="directory of data.noun, data.verb, ...")

    p = command(dsub, "tokenizer", "train a byte-level BPE tokenizer on a data set's captions",
                "tmot data tokenizer --data data/shapes --vocab-size 512 --out data/shapes/tokenizer.json",
                cmd_data_tokenizer)
    p.add_argument("--data", required=True, help="image folder with metadata.jsonl")
    p.add_argument("--vocab-size", type=positive_int, default=1024)
    p.add_argument("--out", required=True, help="tokenizer.json to write")


def add_vae(sub: Any) -> None:
    """`tmot vae train|encode|reconstruct`."""
    vae = sub.add_parser("vae", help="train, apply and check the image autoencoder (diffusers AutoencoderKL or VQModel)",
                         description="The image autoencoder: train a small AutoencoderKL (continuous latents) or, with "
                                     "a config of model.kind vq, a VQModel (discrete codes: images as tokens), encode "
                                     "a data set to cached latents or codes, and check reconstructions.",
                         formatter_class=FORMAT,
                         epilog="examples:\n  tmot vae train --config configs/vae/tiny-32.yaml --data data/shapes --out vae32"
                                "\n  tmot vae train --config vq-tiny-32 --data data/shapes --out vq32")
    vsub = vae.add_subparsers(dest="vae_command", required=True, metavar="ACTION", parser_class=Parser)
    p = command(vsub, "train", "train an AutoencoderKL (reconstruction + KL) or a VQModel (reconstruction + codebook + "
                "commitment, dead codes restarted) and save_pretrained it",
                "tmot vae train --config configs/vae/tiny-32.yaml --data data/shapes --out vae32 --max-steps 3000",
                cmd_vae_train)
    p.add_argument("--config", required=True,
                   help="VAE config: a YAML file or a shipped name (tiny-32, tiny-64; vq-tiny-32 for a VQModel)")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--max-steps", type=positive_int, default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")

    p = command(vsub, "encode", "encode an image folder to cached latents, or int64 codes for a VQModel "
                "(safetensors shards)",
                "tmot vae encode --vae vae32 --data data/shapes --out latents/shapes", cmd_vae_encode)
    p.add_argument("--vae", required=True, help="directory written by tmot vae train, or a hub id")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--split", default=None, help="only this split (train/val); default: all")

    p = command(vsub, "reconstruct", "side-by-side originals and reconstructions, with PSNR (and codebook usage "
                "for a VQModel)",
                "tmot vae reconstruct --vae vae32 --data data/shapes --out recon.png", cmd_vae_reconstruct)
    p.add_argument("--vae", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, help="PNG grid to write")
    p.add_argument("--n", type=positive_int, default=16)
    p.add_argument("--split", default="val")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    name = " ".join(filter(None, ["tmot", args.command, getattr(args, "data_command", None),
                                  getattr(args, "vae_command", None), getattr(args, "eval_command", None)]))
    return run_command(name, lambda: args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
