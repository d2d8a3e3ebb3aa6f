"""Every command of the README runs, as written, at toy size.

The README's ```bash blocks are read command by command (continuation lines joined, `&&` chains split,
comments dropped, split as the shell splits them, so a quoting mistake fails; `[optional words]` are run
too, the brackets taken off) and its ```python blocks whole; a fence of any other language fails here.
Every command and block needs exactly one entry in STEPS, and every entry must still be in the README, so an
example added, changed or removed fails here until its entry says how it runs. (Commands quoted in prose
or in comments are not run.) They run in README order in one workspace, so run this file whole: the
placeholders are tiny fixtures (`photos/`, `data/mine`, `my.yaml`, `prompts.txt`, `LATENTS`, COCO's
captions and images, GenEval's metadata, WebDataset shards for `/data/coco/...`), and an offline Hugging
Face cache holds tiny stand-ins under the real hub ids (Qwen/Qwen2.5-0.5B, meta-llama/Llama-3.2-1B,
openai/clip-vit-large-patch14, stabilityai/sd-vae-ft-ema, timm/vit_large_patch14_dinov2.lvd142m), so those
commands run unchanged, and `dinov2-vitl14` is that tiny ViT saved with timm.models.save_for_hf; FID's
Inception is a TorchScript stand-in with its layout (NVIDIA's weights are tested in tests/eval). The
built-in data sets are built at toy size (60 shapes, 2 VAE and 2 VQ steps) first. Toy size otherwise: flags
appended (argparse keeps the last) or placeholder words swapped, listed with each command. A command the
README gives twice runs once.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from helpers import (
    cli_env,
    make_square_folder,
    make_tiny_clip,
    make_tiny_lm,
    make_tiny_timm_vit,
    write_fake_inception,
)
from PIL import Image

from eval.inception import ENV_WEIGHTS

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PROCESS = {"tmot": [sys.executable, "-m", "transfusion_mot"], "python": [sys.executable],
           "torchrun": [sys.executable, "-m", "torch.distributed.run"]}


# -- the README, read


@dataclass(frozen=True)
class Example:
    """One README command (its words as the shell splits them, and with its optional words) or one Python
    block (its text)."""

    line: int
    words: tuple[str, ...] = ()
    with_optional: tuple[str, ...] = ()
    code: str = ""

    @property
    def key(self) -> str:
        return shlex.join(self.words) if self.words else f"python: {self.code.splitlines()[0]}"


def _commands(text: str, first_line: int) -> list[Example]:
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        start, command = i, lines[i]
        while command.rstrip().endswith("\\") and not command.lstrip().startswith("#"):
            i += 1
            command = command.rstrip()[:-1] + " " + lines[i].strip()
        i += 1
        words, every, optional = [], [], False  # `[--flag value]` marks optional words
        for word in shlex.split(command, comments=True):
            optional = optional or word.startswith("[")
            every.append(word.removeprefix("[").removesuffix("]") if optional else word)
            if not optional:
                words.append(word)
            optional = optional and not word.endswith("]")
        while words:
            cut, cut_every = (w.index("&&") if "&&" in w else len(w) for w in (words, every))
            out.append(Example(first_line + start, tuple(words[:cut]), tuple(every[:cut_every])))
            words, every = words[cut + 1:], every[cut_every + 1:]
    return out


def readme_examples(text: str) -> list[Example]:
    """The README's commands (each once, at its first place) and Python blocks, in order."""
    fences = re.findall(r"^```(.*)$", text, re.MULTILINE)[::2]  # the opening ones
    assert set(fences) <= {"bash", "python"}, f"README code blocks this test cannot run: {set(fences)}"
    examples, seen = [], set()
    for match in re.finditer(r"^```(bash|python)\n(.*?)^```", text, re.DOTALL | re.MULTILINE):
        line = text[: match.start(2)].count("\n") + 1
        if match.group(1) == "python":
            examples.append(Example(line, code=match.group(2)))
            continue
        for example in _commands(match.group(2), line):
            if example.key not in seen:
                seen.add(example.key)
                examples.append(example)
    return examples


# -- how each one runs here


@dataclass(frozen=True)
class Output:
    out: str  # what it printed (stdout)
    err: str  # what it said (stderr)


@dataclass(frozen=True)
class Step:
    toy: tuple[str, ...] = ()  # appended to the command
    swap: dict[str, str] = field(default_factory=dict)  # README word (or, in Python, text) -> what stands in for it
    process: bool = False  # its own process: reads hub ids through the workspace's Hugging Face cache, or forks
    skip: str = ""  # why it does not run here
    check: Callable[[Path, Output], None] | None = None  # (workspace, what it printed): what it must have made


TRAIN_TOY = ("--max-steps", "2", "--no-progress")
# the shipped VAE and classifier
DEMO_TOY = ("--steps", "2", "--num-images", "200", "--sample-steps", "2", "--no-progress")
MVD_TOY = ("--steps", "2", "--eval-samples", "4", "--bench-n", "0")  # bench: a 1,000-step classifier (shapes)
LMF_TOY = ("--steps", "2", "--lm-steps", "2", "--lm-dim", "32", "--lm-layers", "1", "--eval-samples", "4",
           "--bench-n", "0")
# the paper's 760M recipe for 8 GPUs, cut to two CPU processes and a toy model
COCO_TOY = ("--max-steps", "2", "--no-progress", "--set", "model.dim=32", "--set", "model.n_layers=2",
            "--set", "model.n_heads=2", "--set", "model.ffn_dim=64", "--set", "model.max_seq_len=256",
            "--set", "data.image_size=16", "--set", "data.token_budget=256", "--set", "data.num_workers=0",
            "--set", "data.shuffle_buffer=4", "--set", "train.batch_size=2", "--set", "train.device=cpu",
            "--set", "train.precision=fp32", "--set", "train.compile=false", "--set", "model.vocab_size=300")
SETUP = ".ci/run makes this virtual environment and installs the package with its dev extra on every CI run"


def _summary(run: str, step: int) -> Callable[[Path, Output], None]:
    def check(ws: Path, printed: Output) -> None:
        assert json.loads((ws / run / "summary.json").read_text())["step"] == step

    return check


def _demo_took_the_toy_flags(ws: Path, printed: Output) -> None:
    """The toy flags reached the demo (the last of a flag wins, as with argparse)."""
    _files("tmot_demo/report.md", "tmot_demo/run/summary.json")(ws, printed)
    settings = json.loads((ws / "tmot_demo" / "report.json").read_text())["settings"]
    assert (settings["train_steps"], settings["sample_steps"], settings["fid_images"]) == (2, 2, 4)


def _own_vae(ws: Path, printed: Output) -> None:
    """A VAE trained here (its training log beside it), not the shipped copy."""
    _summary("runs/own-vae", 2)(ws, printed)
    assert (ws / "tmot_data_own" / "shapes-32" / "vae" / "train_log.jsonl").is_file()


def _benchmark(out: str, seeds: list[int], bench: bool = False) -> Callable[[Path, Output], None]:
    """The benchmark's last line (its JSON) names its output folder and seeds; with `bench`, every variant
    was also scored (FID at equal n)."""
    def check(ws: Path, printed: Output) -> None:
        result = json.loads(printed.out.strip().splitlines()[-1])
        assert result["out"] == out and result["seeds"] == seeds
        if bench:
            variants = json.loads((ws / out / "results.json").read_text())["variants"]
            assert all(v.get("fid") is not None for v in variants.values()), variants

    return check


def _codes(cache: str) -> Callable[[Path, Output], None]:
    def check(ws: Path, printed: Output) -> None:
        index = json.loads((ws / cache / "index.json").read_text())
        assert index["kind"] == "codes" and index["latent_shape"] == [8, 8] and index["codebook_size"] == 256

    return check


def _chameleon_benchmark(ws: Path, printed: Output) -> None:
    """The last line names the keys the README reports; Transfusion ran the steps of Chameleon's FLOPs."""
    result = json.loads(printed.out.strip().splitlines()[-1])
    assert {"transfusion_mot_all_correct", "chameleon_mot_all_correct", "chameleon_mot_steps_ratio",
            "transfusion_mot_steps_ratio", "chameleon_sample_s_per_image", "transfusion_sample_s_per_image"} <= set(result)
    assert result["steps"] == 2 and result["transfusion_equal_flops_steps"] > 2
    assert (ws / result["out"] / "results.md").is_file()


def _trained_its_own_bpe(ws: Path, printed: Output) -> None:
    """`your data`: the run trained a BPE of the cache's captions, sized the model to it, said once that
    there is no held-out set, and trained on."""
    from transfusion_mot.tokenizer import HFTokenizer

    run = ws / "runs" / "mine"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["tokenizer"]["path"] == str((run / "tokenizer.json").resolve())
    assert saved["model"]["vocab_size"] == HFTokenizer(run / "tokenizer.json").vocab_size
    assert saved["model"]["untie"] == [] and saved["optim"]["lr"] == 3e-4
    assert printed.err.count("training without held-out losses") == 1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 2 and "validation" not in summary


def _held_out(ws: Path, printed: Output) -> None:
    summary = json.loads((ws / "runs" / "mine-heldout" / "summary.json").read_text())
    assert summary["step"] == 2 and summary["validation"]


def _resumed(ws: Path, printed: Output) -> None:
    """The resume continued runs/shapes-tiny to step 4 with its own tokenizer (not trained again)."""
    assert "[tokenizer]" not in printed.err
    assert json.loads((ws / "runs" / "shapes-tiny" / "summary.json").read_text())["step"] == 4


def _photos(ws: Path, printed: Output) -> None:
    from transfusion_mot.data.imageio import read_metadata

    assert len(read_metadata(ws / "data" / "photos")) == 3  # every photo, resized to 64 px


def _photos_min_side(ws: Path, printed: Output) -> None:
    """The same folder again with --min-side 64: the 40 px photo is skipped and counted."""
    from transfusion_mot.data.imageio import read_metadata

    assert sorted(r["text"] for r in read_metadata(ws / "data" / "photos")) == ["a green field", "a red kite"]


def _fid(ws: Path, printed: Output) -> None:
    """FID of the first `tmot sample`'s 8 images (2 prompts, 4 each), exactly those its manifest lists."""
    report = json.loads(printed.out)
    assert report["n_fake"] == 8 and report["fid"] > 0


def _fd(ws: Path, printed: Output) -> None:
    """FD-DINOv2 of the same 8 images, by the stand-in found under DINOv2's hub id."""
    report = json.loads(printed.out)
    assert report["n_fake"] == 8 and report["fd"] > 0 and report["features"] == "dinov2"
    assert report["extractor"] == "timm:vit_large_patch14_dinov2.lvd142m" and "224x224" in report["preprocessing"]


def _prdc(ws: Path, printed: Output) -> None:
    assert printed.out.startswith("precision ") and "k=5" in printed.out and "8 fake" in printed.out


def _every_metric(ws: Path, printed: Output) -> None:
    """One report with every metric: none skipped."""
    summary = json.loads((ws / "tmot_demo" / "bench" / "report.json").read_text())["summary"]
    assert [k for k, v in summary.items() if v is None] == [], summary
    for name in ("FID", "KID", "FD-DINOv2", "precision", "recall", "density", "coverage", "CLIP score", "CMMD",
                 "all_correct"):
        assert name in printed.out, name


def _files(*paths: str) -> Callable[[Path, Output], None]:
    def check(ws: Path, printed: Output) -> None:
        missing = [p for p in paths if not (ws / p).exists()]
        assert not missing, f"not made: {missing}"

    return check


def _compiled(out: str) -> Callable[[Path, Output], None]:
    def check(ws: Path, printed: Output) -> None:
        manifest = json.loads((ws / out / "manifest.json").read_text())
        assert manifest["compiled"] is True and len(manifest["images"]) == 4, manifest
        assert "blocks compiled: " in printed.out, printed.out  # the process's counts (earlier tests' too)

    return check


def _rescaled(ws: Path, printed: Output) -> None:
    manifest = json.loads((ws / "samples-rescaled" / "manifest.json").read_text())
    assert manifest["cfg"] == 5 and manifest["guidance_rescale"] == 0.7 and len(manifest["images"]) == 1, manifest


def _served(ws: Path, printed: Output) -> None:
    assert LAUNCHES and LAUNCHES[-1]["server_port"] == 7860 and LAUNCHES[-1]["server_name"] == "0.0.0.0"


def _pushed(ws: Path, printed: Output) -> None:
    assert "pushed to https://huggingface.co/ORG/shapes-tiny-mot" in printed.out
    assert (_hub_snapshot(ws / "hf-hub", "ORG/shapes-tiny-mot") / "pipeline.json").is_file()


STEPS: dict[str, Step] = {
    # set up and run the demo / the tests
    "python3 -m venv .venv": Step(skip=SETUP),
    ". .venv/bin/activate": Step(skip=SETUP),
    "pip install -e '.[dev]'": Step(skip=SETUP),
    "tmot demo --out tmot_demo": Step(  # its own process: the data set is generated by worker processes
        DEMO_TOY + ("--fid-images", "4"), process=True, check=_demo_took_the_toy_flags),
    "python -m pytest -q -n 2": Step(skip="this suite: .ci/run runs exactly this command"),
    # MoT versus dense
    "python benchmarks/mot_vs_dense.py --data shapes --steps 3000": Step(
        MVD_TOY, check=_benchmark("mot_vs_dense", [0])),
    "python benchmarks/mot_vs_dense.py --data shapes --steps 2000 --seeds 0,1,2 --jobs 2 --threads 1": Step(
        MVD_TOY, check=_benchmark("mot_vs_dense", [0, 1, 2])),
    "python benchmarks/mot_vs_dense.py --data shapes --steps 3000 --jobs 2 --threads 1 "
    "--variants mot,dense,ffn,ffn_attn,dense_causal,mot_causal --out mvd-shapes": Step(
        MVD_TOY, check=_benchmark("mvd-shapes", [0])),
    "python benchmarks/mot_vs_dense.py --data emoji --steps 2000 --jobs 2 --threads 1 "
    "--variants mot,dense,ffn,ffn_attn,dense_causal,mot_causal --out mvd-emoji": Step(
        MVD_TOY, check=_benchmark("mvd-emoji", [0])),
    "python benchmarks/mot_vs_dense.py --data shapes --steps 2000 --set model.dim=256 --set model.ffn_dim=688": Step(
        MVD_TOY, check=_benchmark("mot_vs_dense", [0])),
    "python benchmarks/mot_vs_dense.py --data LATENTS --val-data VAL_LATENTS --config my.yaml --steps 5000": Step(
        MVD_TOY + ("--bench-n", "2"),
        swap={"LATENTS": "stand-ins/latents-mine", "VAL_LATENTS": "stand-ins/latents-mine-val"},
        check=_benchmark("mot_vs_dense", [0], bench=True)),
    # LMFusion
    "tmot train --config lmfusion-shapes --out runs/lmfusion-shapes": Step(
        TRAIN_TOY, process=True, check=_summary("runs/lmfusion-shapes", 2)),
    "tmot train --config lmfusion-shapes --set model.init_from=meta-llama/Llama-3.2-1B --out runs/llama-shapes": Step(
        TRAIN_TOY, process=True, check=_summary("runs/llama-shapes", 2)),
    "tmot info --config lmfusion-shapes": Step(process=True),
    "tmot info --config lmfusion-shapes --world-size 8": Step(process=True),
    "tmot data corpus --out data/corpus": Step(check=_files("data/corpus/val.txt")),
    "tmot train --config lmfusion-shapes --out runs/lmfusion-corpus --set data.text_val_path=data/corpus/val.txt": Step(
        TRAIN_TOY, process=True, check=_summary("runs/lmfusion-corpus", 2)),
    "tmot export --run runs/lmfusion-shapes --out lmfusion-model --text-lm lmfusion-text-lm": Step(
        check=_files("lmfusion-model/pipeline.json", "lmfusion-text-lm/config.json")),
    "python benchmarks/lmfusion.py --steps 40 --out lmfusion": Step(LMF_TOY, check=_benchmark("lmfusion", [0])),
    "tmot train --config lmfusion-shapes --set model.init_from=lmfusion/lm --max-steps 50 --out runs/lmf-cpu": Step(
        TRAIN_TOY, check=_summary("runs/lmf-cpu", 2)),
    "python benchmarks/lmfusion.py --steps 40": Step(LMF_TOY, check=_benchmark("lmfusion", [0])),
    "python benchmarks/lmfusion.py --steps 1000": Step(  # three seeds from 500 steps on: two here
        LMF_TOY + ("--seeds", "0,1"), check=_benchmark("lmfusion", [0, 1])),
    # the demo and the accounting
    "tmot demo --out quick --steps 50 --num-images 500 --fid-images 0 --sample-steps 10": Step(
        DEMO_TOY, process=True, check=_files("quick/report.md")),
    "tmot demo --out scratch --vae-steps 1000 --classifier-steps 1000": Step(
        DEMO_TOY + ("--vae-steps", "2", "--classifier-steps", "2", "--fid-images", "0"),
        check=_files("scratch/report.md", "scratch/shapes-classifier/model.safetensors",
                     "scratch/shapes-32/vae/train_log.jsonl")),
    "tmot info --config 760m": Step(),
    "tmot info --config configs/model/760m.yaml --set 'untie=[]' --json": Step(),
    # data
    "tmot data shapes --out data/shapes --num 20000 --size 32 --seed 0": Step(("--num", "40")),
    "tmot data emoji --out data/emoji --size 32": Step(check=_files("data/emoji/metadata.jsonl")),
    "tmot data folder --src photos/ --out data/photos --size 64": Step(check=_photos),
    "tmot data folder --src photos/ --out data/photos --size 64 --max-pixels 40000000 --min-side 64 --workers 2": Step(
        process=True, check=_photos_min_side),
    "tmot data tokenizer --data data/shapes --vocab-size 512 --out data/shapes/tokenizer.json": Step(
        check=_files("data/shapes/tokenizer.json")),
    # the VAE
    "tmot vae train --config tiny-32 --data data/shapes --out vae32 --max-steps 2000": Step(("--max-steps", "2")),
    "tmot vae encode --vae vae32 --data data/shapes --out latents/shapes": Step(
        check=_files("latents/shapes/index.json")),
    "tmot vae reconstruct --vae vae32 --data data/shapes --out recon.png --n 16": Step(check=_files("recon.png")),
    "tmot vae train --config vq-tiny-32 --data data/shapes --out vq32": Step(("--max-steps", "2")),
    "tmot vae encode --vae vq32 --data data/shapes --out codes/shapes": Step(check=_codes("codes/shapes")),
    "tmot vae reconstruct --vae vq32 --data data/shapes --out recon-vq.png --n 16": Step(
        check=_files("recon-vq.png")),
    # Transfusion versus Chameleon
    "tmot train --config shapes-chameleon-tiny --out runs/shapes-chameleon": Step(
        TRAIN_TOY, check=_summary("runs/shapes-chameleon", 2)),
    "tmot sample --run runs/shapes-chameleon --prompt 'a large red circle' --n 4 --cfg 3 --temperature 1.0 "
    "--out samples-chameleon/": Step(check=_files("samples-chameleon/grid.png")),
    "python benchmarks/transfusion_vs_chameleon.py --steps 1500 --jobs 2 --threads 1": Step(
        ("--steps", "2", "--eval-samples", "4", "--bench-n", "0"), check=_chameleon_benchmark),
    # training
    "tmot train --config shapes-tiny --out runs/shapes-tiny": Step(TRAIN_TOY, check=_summary("runs/shapes-tiny", 2)),
    "tmot train --config shapes-tiny --out runs/own-vae --set data.builtin_vae=train --set data.builtin_dir=tmot_data_own":
        Step(TRAIN_TOY + ("--set", "data.builtin_vae_steps=2", "--set", "data.builtin_num_images=60",
                          "--set", "train.batch_size=4"), check=_own_vae),
    "tmot vae encode --vae vae32 --data data/mine --split train --out latents/mine": Step(),
    "tmot train --config shapes-tiny --out runs/mine --data latents/mine --max-steps 5000 --set optim.lr=3e-4 "
    "--set 'model.untie=[]'": Step(TRAIN_TOY, check=_trained_its_own_bpe),
    "tmot vae encode --vae vae32 --data data/mine --split val --out latents/mine-val": Step(),
    "tmot train --config my.yaml --out runs/mine-heldout --data latents/mine --val-data latents/mine-val "
    "--eval-every 500": Step(TRAIN_TOY + ("--eval-every", "1"), check=_held_out),
    "tmot train --out runs/shapes-tiny --resume": Step(("--max-steps", "4", "--no-progress"), check=_resumed),
    "torchrun --standalone --nproc_per_node 8 -m transfusion_mot train --config coco-760m --out runs/coco-760m "
    "--data '/data/coco/{00000..00059}.tar' --vae stabilityai/sd-vae-ft-ema": Step(
        COCO_TOY, process=True, swap={"8": "2", "/data/coco/{00000..00059}.tar": "coco/{00000..00001}.tar"},
        check=_summary("runs/coco-760m", 2)),
    # sampling, captioning, sharing
    "tmot sample --run runs/shapes-tiny --prompt 'a large red circle' --prompt 'a small blue cross' --n 4 --seed 0 "
    "--cfg 3 --steps 50 --scheduler flow --out samples/": Step(("--steps", "2"), check=_files("samples/grid.png")),
    "tmot sample --run runs/shapes-tiny --prompt 'a large orange circle' --cfg 5 --guidance-rescale 0.7 "
    "--out samples-rescaled/": Step(("--steps", "2"), check=_rescaled),
    "tmot sample --run runs/shapes-tiny --prompts prompts.txt --n 1 --out samples-file/": Step(
        ("--steps", "2"), check=_files("samples-file/00001.png")),
    "tmot sample ... --no-kv-cache": Step(
        ("--steps", "2"), swap={"...": "--run runs/shapes-tiny --prompt 'a red circle' --out samples-exact/"},
        check=_files("samples-exact/manifest.json")),
    "tmot sample --run runs/shapes-tiny --prompts prompts.txt --n 2000 --batch-size 64 --compile "
    "--out samples-many/": Step(("--n", "2", "--steps", "2"), check=_compiled("samples-many")),
    "tmot caption --run runs/shapes-tiny samples/00000.png samples/00001.png": Step(),
    "tmot export --run runs/shapes-tiny --out shapes-tiny-model": Step(check=_files("shapes-tiny-model/pipeline.json")),
    "tmot sample --run shapes-tiny-model --prompt 'a large green square' --out samples-export/": Step(
        ("--steps", "2"), check=_files("samples-export/manifest.json")),
    "tmot export --run runs/shapes-tiny --out shapes-tiny-model --push-to-hub ORG/shapes-tiny-mot": Step(check=_pushed),
    "tmot sample --run ORG/shapes-tiny-mot --prompt 'a large green square' --out samples-hub/": Step(
        ("--steps", "2"), process=True, check=_files("samples-hub/manifest.json")),
    "tmot serve --run tmot_demo/run": Step(check=_served),
    "tmot plot runs/mot runs/dense --out curves.png": Step(
        swap={"runs/mot": "mot_vs_dense/runs/mot", "runs/dense": "mot_vs_dense/runs/dense", "step|time|both": "both"},
        check=_files("curves.png")),
    # evaluation
    "tmot eval fid --real data/shapes/images --fake samples/ --json": Step(check=_fid),
    "tmot eval fid --real data/shapes/images --save-stats shapes_ref.npz": Step(check=_files("shapes_ref.npz")),
    "tmot eval fid --real shapes_ref.npz --fake samples/ --inception /path/inception-2015-12-05.pt": Step(
        swap={"/path/inception-2015-12-05.pt": "stand-ins/inception.pt"}),
    "tmot eval fd --real data/shapes/images --fake samples/ --json": Step(process=True, check=_fd),
    "tmot eval fd --model local-dir:dinov2-vitl14 --real data/shapes/images --save-stats shapes_dinov2.npz": Step(
        check=_files("shapes_dinov2.npz")),
    "tmot eval prdc --model local-dir:dinov2-vitl14 --real shapes_dinov2.npz --fake samples/ --k 5": Step(check=_prdc),
    "tmot eval align-train --out shapes_clf": Step(("--steps", "2", "--eval-images", "8")),
    "tmot eval bench --run runs/shapes-tiny --data tmot_data/shapes-32/data --n 1000 --classifier shapes_clf "
    "--out bench": Step(("--n", "4"), check=_files("bench/report.json", "bench/metadata.jsonl")),
    "tmot eval bench --run tmot_demo/run --data tmot_demo/shapes-32/data --n 1000 "
    "--clip-model openai/clip-vit-large-patch14 --dinov2-model local-dir:dinov2-vitl14 "
    "--out tmot_demo/bench": Step(("--n", "8"), process=True, check=_every_metric),
    "tmot eval clip --images bench/ --model openai/clip-vit-large-patch14": Step(process=True),
    "tmot eval align --images bench/": Step(),
    "tmot eval align --images bench/ --classifier shapes_clf": Step(),
    "tmot eval coco reference --captions captions_val2014.json --images val2014 --out coco256 "
    "--stats coco256.npz": Step(
        ("--n", "4", "--size", "32"), check=_files("coco256.npz")),
    "tmot eval cmmd --real coco256 --fake bench/images --clip-model DIR_OR_ID": Step(swap={"DIR_OR_ID": "clip"}),
    "tmot eval bench --run runs/coco-760m --coco-captions captions_val2014.json --n 30000 "
    "--ref-stats coco256.npz": Step(
        ("--n", "2"), process=True, check=_files("runs/coco-760m/bench/report.json")),
    "tmot eval geneval-export --run RUN --metadata geneval/prompts/evaluation_metadata.jsonl --out geneval_out": Step(
        ("--n-samples", "1"), swap={"RUN": "runs/shapes-tiny"}, check=_files("geneval_out/00001/samples/0000.png")),
    # Python
    "python: import torch": Step(check=_files("tiny-model/model.safetensors")),
    "python: from transfusion_mot.config import load_run_config": Step(
        swap={'["train.max_steps=200"]': '["train.max_steps=2", "train.progress=false"]'},
        check=_summary("runs/from-python", 2)),
    "python: from transfusion_mot.inference.pipeline import Pipeline": Step(swap={"num_steps=50": "num_steps=2"}),
}
LAUNCHES: list[dict] = []


# -- the workspace: the README's placeholders as tiny fixtures


def _hub_snapshot(cache: Path, repo_id: str) -> Path:
    return cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / ("0" * 40)


def _put_on_hub(cache: Path, repo_id: str, folder: Path) -> None:
    """`folder` as the cached snapshot of `repo_id` (huggingface_hub's cache layout), what an offline
    `snapshot_download` or `from_pretrained(repo_id)` finds."""
    snapshot = _hub_snapshot(cache, repo_id)
    shutil.rmtree(snapshot, ignore_errors=True)
    shutil.copytree(folder, snapshot)
    (snapshot.parents[1] / "refs").mkdir(exist_ok=True)
    (snapshot.parents[1] / "refs" / "main").write_text(snapshot.name)


def _your_data(ws: Path) -> None:
    """Photos, an image folder, a config, a prompt file and latent caches: what the README calls yours."""
    from vae import encode_folder

    photos = ws / "photos"  # three photos with sidecar captions, one of them too small
    photos.mkdir()
    for i, (size, text) in enumerate([(96, "a red kite"), (80, "a green field"), (40, "a tiny stamp")]):
        Image.new("RGB", (size + 10, size), (40 * i, 200 - 50 * i, 90)).save(photos / f"p{i}.jpg")
        (photos / f"p{i}.txt").write_text(text)
    make_square_folder(ws / "data" / "mine", n=32, size=32, val_every=4)  # an image folder: train and val rows
    shutil.copy(ROOT / "configs" / "train" / "shapes-tiny.yaml", ws / "my.yaml")  # a config, from a shipped one
    (ws / "prompts.txt").write_text("a large red circle\na small green square above a large blue circle\n")
    for split, cache in (("train", "latents-mine"), ("val", "latents-mine-val")):  # LATENTS, VAL_LATENTS
        encode_folder(ws / "tmot_data" / "shapes-32" / "vae", ws / "data" / "mine", ws / "stand-ins" / cache,
                      split=split, progress=False)


def _coco_and_geneval(ws: Path, scenes: list[dict]) -> None:
    """COCO's val2014 images and captions JSON, the same kind of pairs as WebDataset shards (for the
    torchrun line), and GenEval's prompt metadata."""
    import webdataset as wds

    from transfusion_mot.data.shapes import render_shapes

    (ws / "val2014").mkdir()
    coco = {"images": [], "annotations": []}
    for i, scene in enumerate(scenes[:6]):
        name = f"COCO_val2014_{i + 1:012d}.jpg"
        render_shapes(scene["objects"], 64).save(ws / "val2014" / name)
        coco["images"].append({"id": i + 1, "file_name": name})
        coco["annotations"] += [{"id": 10 * i + k, "image_id": i + 1, "caption": scene["text"]} for k in (1, 2)]
    (ws / "captions_val2014.json").write_text(json.dumps(coco))
    (ws / "coco").mkdir()
    for shard in range(2):
        with wds.TarWriter(str(ws / "coco" / f"{shard:05d}.tar")) as sink:
            for k, scene in enumerate(scenes[8 * shard: 8 * shard + 8]):
                sink.write({"__key__": f"{shard:05d}{k:04d}", "jpg": render_shapes(scene["objects"], 32),
                            "txt": scene["text"]})
    metadata = ws / "geneval" / "prompts" / "evaluation_metadata.jsonl"
    metadata.parent.mkdir(parents=True)
    metadata.write_text("".join(json.dumps({"tag": "single_object", "include": [{"class": c, "count": 1}],
                                            "prompt": f"a photo of a {c}"}) + "\n" for c in ("circle", "square")))


def _hub_stand_ins(ws: Path, english: tuple[str, ...]) -> None:
    """Tiny models under the hub ids the README names, in the workspace's Hugging Face cache; the language
    models' tokenizers know English words as real ones do (a shapes caption is a dozen of their tokens,
    within lmfusion-shapes' max_text_tokens)."""
    from vae import VAEConfig, build_vae, set_latent_stats

    stand_ins = ws / "stand-ins"
    make_tiny_lm(stand_ins / "qwen", arch="qwen2", vocab_size=600, texts=english)
    make_tiny_lm(stand_ins / "llama", arch="llama", vocab_size=600, texts=english)
    make_tiny_clip(ws / "clip")
    make_tiny_timm_vit(ws / "dinov2-vitl14")
    vae = build_vae(VAEConfig(block_out_channels=[8, 16], norm_num_groups=8, sample_size=16))
    set_latent_stats(vae, shift_factor=0.0, scaling_factor=1.0)
    vae.save_pretrained(stand_ins / "sd-vae")
    for repo_id, folder in (("Qwen/Qwen2.5-0.5B", stand_ins / "qwen"), ("meta-llama/Llama-3.2-1B", stand_ins / "llama"),
                            ("openai/clip-vit-large-patch14", ws / "clip"),
                            ("stabilityai/sd-vae-ft-ema", stand_ins / "sd-vae"),
                            ("timm/vit_large_patch14_dinov2.lvd142m", ws / "dinov2-vitl14")):
        _put_on_hub(ws / "hf-hub", repo_id, folder)
    write_fake_inception(stand_ins / "inception.pt")  # Inception's layout (NVIDIA's weights: tests/eval)


def _make_stand_ins(ws: Path) -> None:
    import random

    from transfusion_mot.data.shapes import sample_scene
    from transfusion_mot.recipes.prepare import prepare_builtin

    for name in ("configs", "benchmarks"):  # the README's commands run in the checkout
        (ws / name).symlink_to(ROOT / name)
    for name in ("shapes", "emoji"):  # the built-in data sets, at toy size, where the runs look for them
        prepare_builtin(name, ws / "tmot_data" / f"{name}-32", num_images=60, vae_steps=2, progress=False,
                        log=lambda *a: None)
    prepare_builtin("shapes", ws / "tmot_data" / "shapes-32", num_images=60, vae_steps=2, progress=False,
                    log=lambda *a: None, codes=True)  # the Chameleon recipe's VQ tokenizer and code caches
    _your_data(ws)
    rng = random.Random(0)
    _coco_and_geneval(ws, [sample_scene(rng, 32) for _ in range(16)])
    _hub_stand_ins(ws, tuple(sample_scene(rng, 32)["text"] for _ in range(400)))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("readme")
    _make_stand_ins(ws)
    return ws


# -- running one


def _argv(example: Example, step: Step) -> list[str]:
    """The command with its optional words, placeholders swapped, toy flags appended."""
    words = []
    for word in example.with_optional:
        words += shlex.split(step.swap[word]) if word in step.swap else [word]
    return [*words, *step.toy]


def _fake_hub(ws: Path, monkeypatch) -> None:
    """`--push-to-hub` lands in the workspace's Hugging Face cache (no network, no login)."""

    class Api:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, repo_type, private, exist_ok):
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, folder_path, repo_id, repo_type, commit_message):
            _put_on_hub(ws / "hf-hub", repo_id, Path(folder_path))

    monkeypatch.setattr("huggingface_hub.HfApi", Api)


def _inception_stand_in(argv: list[str], ws: Path) -> dict[str, str]:
    """$TMOT_INCEPTION_WEIGHTS for a command that does not name its Inception file (one that does must be
    read from its own flag: with the variable unset, ignoring the flag would load other weights)."""
    return {} if "--inception" in argv else {ENV_WEIGHTS: str(ws / "stand-ins" / "inception.pt")}


def _run_in_process(argv: list[str], ws: Path, monkeypatch, capsys) -> Output:
    from transfusion_mot.cli import main

    monkeypatch.chdir(ws)
    monkeypatch.delenv(ENV_WEIGHTS, raising=False)
    for name, value in {**_inception_stand_in(argv, ws), "GRADIO_ANALYTICS_ENABLED": "False"}.items():
        monkeypatch.setenv(name, value)  # restored afterwards, as is anything `tmot serve` sets
    monkeypatch.setattr("gradio.Blocks.launch", lambda self, **kw: LAUNCHES.append(kw))
    _fake_hub(ws, monkeypatch)
    try:
        code = main(argv[1:])
    except SystemExit as exit_:
        code = exit_.code
    printed = capsys.readouterr()
    assert code in (0, None), f"{shlex.join(argv)} exited {code}:\n{printed.err[-3000:]}"
    return Output(printed.out, printed.err)


def _run_as_process(argv: list[str], ws: Path) -> Output:
    env = {k: v for k, v in cli_env().items() if k != ENV_WEIGHTS}
    env.update({"HF_HUB_CACHE": str(ws / "hf-hub"), "HF_HOME": str(ws / "hf-home"), "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1", "MPLBACKEND": "Agg", **_inception_stand_in(argv, ws)})
    result = subprocess.run([*PROCESS[argv[0]], *argv[1:]], cwd=ws, env=env, capture_output=True, text=True,
                            timeout=900, check=False)
    assert result.returncode == 0, f"{shlex.join(argv)} exited {result.returncode}:\n{result.stderr[-3000:]}"
    return Output(result.stdout, result.stderr)


def _run_python(example: Example, step: Step, ws: Path, monkeypatch, capsys) -> Output:
    code = example.code
    for old, new in step.swap.items():
        assert old in code, f"the README's Python block no longer has {old!r}"
        code = code.replace(old, new)
    monkeypatch.chdir(ws)
    exec(compile(code, f"README.md:{example.line}", "exec"), {"__name__": "readme"})  # noqa: S102  (README code)
    printed = capsys.readouterr()
    return Output(printed.out, printed.err)


EXAMPLES = readme_examples(README.read_text())


def test_every_readme_example_has_exactly_one_way_to_run():
    keys = [e.key for e in EXAMPLES]
    assert len(set(keys)) == len(keys), "two Python blocks start with the same line: make their first lines differ"
    assert [k for k in keys if k not in STEPS] == [], "README examples with no entry in STEPS"
    assert [k for k in STEPS if k not in keys] == [], "entries in STEPS that are no longer README examples"
    for example in EXAMPLES:
        step = STEPS[example.key]
        assert example.words or not step.toy, f"{example.key}: a Python block takes swaps, not flags"
        if example.words:
            unused = [w for w in step.swap if w not in example.with_optional]
            assert not unused, f"{example.key}: swaps for words it does not have: {unused}"
            assert example.words[0] in PROCESS or step.skip, f"{example.key}: what runs it?"


@pytest.mark.parametrize("example", EXAMPLES, ids=[f"L{e.line}:{e.key[:60]}" for e in EXAMPLES])
def test_readme_example_runs(example, workspace, monkeypatch, capsys):
    step = STEPS[example.key]  # every example has one (the test above)
    if step.skip:
        pytest.skip(step.skip)
    if not example.words:
        printed = _run_python(example, step, workspace, monkeypatch, capsys)
    elif step.process or example.words[0] != "tmot":
        printed = _run_as_process(_argv(example, step), workspace)
    else:
        printed = _run_in_process(_argv(example, step), workspace, monkeypatch, capsys)
    if step.check:
        step.check(workspace, printed)
