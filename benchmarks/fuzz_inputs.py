"""A fuzzer of user input: over a thousand generated malformed inputs through every kind of command, each
judged by what the command did with it.

Families: training configs with mutated keys, types and values; prompts (empty, huge, binary, every script,
malformed prompt files); images (truncated, zero-byte, wrong extension, a header claiming huge dimensions,
animated, CMYK, 16-bit, palette) through `tmot caption` and `tmot data folder`; image-folder metadata with bad
lines, missing fields and wrong types; latent caches truncated, swapped, with a bad index or wrong shapes;
checkpoints truncated, swapped, with a bad state.json or weights of another model; WebDataset shards cut
mid-file. Every case runs `tmot` in this process (`transfusion_mot.cli.main`) on a small workspace built
first (shapes images, an untrained tiny VAE, a latent cache, a 2-step run, its export, shards).

Verdicts: "clean error" (non-zero exit, one line), "handled and reported" (it went on, saying what it
skipped), "ok" (a valid if unusual input that worked), "traceback" (an exception escaped, or a multi-line
error), "silent success" (garbage accepted without a word). Target: 0 tracebacks, 0 silent successes. The
last line is one JSON object.

    python benchmarks/fuzz_inputs.py [--seed 0] [--sample N] [--family NAME] [--show 5]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import shutil
import struct
import sys
import tempfile
import time
import traceback
import warnings
import zlib
from collections import Counter
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from transfusion_mot.common.checkpoint import STATE_FILE
from transfusion_mot.run_dir import EMA_FILE, MODEL_FILE, RunDir

REPO = Path(__file__).resolve().parents[1]
PROGRESS = re.compile(r"\d+%\|")  # a tqdm bar
VERDICTS = ("clean error", "handled and reported", "ok", "traceback", "silent success")


@dataclass
class Case:
    family: str
    name: str
    argv: list[str]
    expect: str  # "error": garbage that must be refused or reported; "either": unusual but possibly valid


# --------------------------------------------------------------------------------------------------
# the workspace


def build_workspace(root: Path) -> dict[str, Any]:
    """Shapes images, a tiny untrained VAE, a latent cache (several shards), a 2-step run, its export, shards."""
    import torch

    from transfusion_mot.cli import main
    from transfusion_mot.data.shapes import generate_shapes
    from vae import VAEConfig, build_vae, encode_folder, set_latent_stats

    generate_shapes(root / "images", num=48, size=16, seed=0, val_fraction=0.25)
    torch.manual_seed(0)
    vae = build_vae(VAEConfig(block_out_channels=[8, 16], norm_num_groups=8, sample_size=16))
    set_latent_stats(vae, shift_factor=0.0, scaling_factor=1.0)
    vae.save_pretrained(root / "vae")
    encode_folder(root / "vae", root / "images", root / "latents", batch_size=16, shard_size=12, split="train",
                  progress=False)
    config = {
        "model": {"dim": 32, "n_layers": 2, "n_heads": 2, "ffn_dim": 64, "vocab_size": 261, "latent_channels": 4,
                  "patch_size": 2, "max_seq_len": 96},
        "tokenizer": {"kind": "bytes"},
        "vae": {"path": str(root / "vae")},
        "data": {"kind": "latents", "path": str(root / "latents"), "num_workers": 0},
        "optim": {"lr": 3e-3, "warmup_steps": 1, "min_lr": 1e-4, "ema_decay": 0.9},
        "train": {"max_steps": 2, "batch_size": 4, "log_every": 1, "save_every": 1, "keep_checkpoints": 0,
                  "progress": False, "tensorboard": False, "device": "cpu"},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        assert main(["train", "--config", str(root / "config.yaml"), "--out", str(root / "run")]) == 0
        assert main(["export", "--run", str(root / "run"), "--out", str(root / "exported")]) == 0
    import webdataset as wds

    rows = [json.loads(line) for line in (root / "images" / "metadata.jsonl").read_text().splitlines()]
    with wds.TarWriter(str(root / "shard-0.tar")) as sink:
        for i, row in enumerate(rows[:24]):
            sink.write({"__key__": f"{i:04d}", "png": (root / "images" / row["file_name"]).read_bytes(),
                        "txt": row["text"].encode()})
    return {"root": root, "config": config, "run": root / "run", "exported": root / "exported",
            "latents": root / "latents", "images": root / "images", "vae": root / "vae", "shard": root / "shard-0.tar"}


# --------------------------------------------------------------------------------------------------
# generators


def _leaves(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out += _leaves(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def _set(d: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    d = json.loads(json.dumps(d))
    node = d
    *path, last = key.split(".")
    for part in path:
        node = node.setdefault(part, {})
    node[last] = value
    return d


# values that are wrong for every field of the given type
WRONG_TYPE = {bool: ["yes", 1, [True], {"a": 1}], int: ["ten", 2.5, [1], {"a": 1}, True, float("nan"), float("inf")],
              float: ["fast", [0.1], {"a": 1}, True, float("nan"), float("inf"), float("-inf")],
              str: [5, [1, 2], {"a": 1}, True], list: ["attn", 5, {"a": 1}]}
# out-of-range values for fields with a range
OUT_OF_RANGE = {"model.dim": [0, -64, 33], "model.n_layers": [0, -1], "model.n_heads": [0, 5], "model.ffn_dim": [0, -1],
                "model.vocab_size": [0, 100], "model.latent_channels": [0, 3], "model.patch_size": [0, 3, 64],
                "model.max_seq_len": [0, 8], "model.num_train_timesteps": [0], "model.image_first_max_t": [-1, 5000],
                "model.pos_embed_scale": [-1.0], "model.untie": [["attn", "moe"]], "model.modalities": [["text"]],
                "model.objective": ["gan"], "model.attn_backend": ["cuda"], "model.norm_placement": ["middle"],
                "data.image_first_ratio": [-0.1, 1.5], "data.caption_dropout": [2.0], "data.text_only_ratio": [0.5],
                "data.kind": ["zip"], "data.token_budget": [0, 100000], "data.num_workers": [-1],
                "data.prefetch_factor": [0], "optim.lr": [0.0, -1e-3], "optim.betas": [[0.9], [1.5, 0.9]],
                "optim.ema_decay": [1.0, -0.1], "optim.warmup_steps": [-5], "optim.grad_clip": [-1.0],
                "train.max_steps": [0, -1], "train.batch_size": [0, -4], "train.grad_accum": [0],
                "train.precision": ["fp8"], "train.device": ["tpu"], "train.log_every": [0], "train.save_every": [0],
                "train.keep_checkpoints": [-1], "train.max_bad_steps": [0], "train.peak_tflops": [0.0, -5.0],
                "tokenizer.kind": ["sentencepiece"], "tokenizer.overflow": ["wrap"]}


def config_cases(ws: dict[str, Any], rng: random.Random) -> list[Case]:
    from transfusion_mot.config import run_config_from_dict

    full = run_config_from_dict(ws["config"]).to_dict()
    full["model"] = ws["config"]["model"] | {k: v for k, v in full["model"].items() if k not in ws["config"]["model"]}
    cases, folder = [], ws["root"] / "configs"
    folder.mkdir(exist_ok=True)
    mutations: list[tuple[str, str, Any]] = []
    for key, value in _leaves(full):
        kind = bool if isinstance(value, bool) else type(value) if value is not None else None
        for bad in WRONG_TYPE.get(kind, []):
            mutations.append((f"{key} = {bad!r} (wrong type)", key, bad))
        if value is not None and key not in ("data.val_path", "data.text_only_path", "data.builtin", "vae.path"):
            if not isinstance(value, (list, str)) or key in OUT_OF_RANGE:
                mutations.append((f"{key} = null", key, None))
        for bad in OUT_OF_RANGE.get(key, []):
            mutations.append((f"{key} = {bad!r} (out of range)", key, bad))
        section, _, leaf = key.rpartition(".")
        typo = leaf[:-1] + ("x" if leaf[-1] != "x" else "y")
        mutations.append((f"unknown key {section}.{typo}", f"{section}.{typo}" if section else typo, value))
    mutations += [(f"unknown section {name}", f"{name}.x", 1) for name in ("trian", "optimizer", "models")]
    valid_none = {"data.token_budget", "data.image_size", "optim.decay_steps", "train.peak_tflops",
                  "tokenizer.max_text_tokens", "tokenizer.path"}
    for i, (name, key, value) in enumerate(mutations):
        if value is None and key in valid_none:
            continue  # null means "the default" there: not garbage
        path = folder / f"c{i:04d}.yaml"
        try:
            path.write_text(yaml.safe_dump(_set(full, key, value)))
        except yaml.YAMLError:
            continue
        cases.append(Case("config", name, ["train", "--config", str(path), "--out", str(ws["root"] / f"cfgrun{i}"),
                                           "--max-steps", "1", "--no-progress"], "error"))
    # broken YAML itself
    for i, text in enumerate(["model: [", "train:\n  max_steps: 1\n bad_indent: 2", "\x00\x01\x02", "- a\n- b",
                              "model: !!python/object:os.system {}", "", "model: {dim: 32"]):
        path = folder / f"yaml{i}.yaml"
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        cases.append(Case("config", f"broken YAML {text[:20]!r}", ["train", "--config", str(path), "--out",
                                                                   str(ws["root"] / "yamlrun"), "--no-progress"], "error"))
    for key, value in [("model.dim", "=32"), ("train", "3"), ("nonsense", "1"), ("model..dim", "3"), ("", "3")]:
        cases.append(Case("config", f"--set {key}={value}", ["train", "--config", str(ws["root"] / "config.yaml"),
                                                             "--out", str(ws["root"] / "setrun"), "--set",
                                                             f"{key}={value}", "--no-progress"], "error"))
    return cases


SCRIPTS = ["a red circle", "un cercle rouge", "ein roter Kreis", "красный круг", "دائرة حمراء", "עיגול אדום",
           "लाल वृत्त", "赤い丸", "红色圆圈", "빨간 원", "วงกลมสีแดง", "κόκκινος κύκλος", "🔴⭕🟥", "Z̷͓a̶l̸g̵o̴",
           "\u202eelcric der a", "tab\tand\nnewline", "a" * 60]


def prompt_cases(ws: dict[str, Any], rng: random.Random) -> list[Case]:
    run, root = str(ws["run"]), ws["root"]
    folder = root / "prompts"
    folder.mkdir(exist_ok=True)
    base = ["sample", "--run", run, "--steps", "1", "--out", str(root / "samples")]
    cases = [Case("prompt", f"script {p[:12]!r}", base + ["--prompt", p], "either") for p in SCRIPTS]
    cases += [Case("prompt", f"huge prompt ({n} chars)", base + ["--prompt", "x" * n], "error") for n in (200, 5000, 100000)]
    cases += [Case("prompt", f"{n}-char prompt in script {s[:6]!r}", base + ["--prompt", (s * 100)[:n]], "either")
              for s in SCRIPTS[:12] for n in (30, 80)]
    cases.append(Case("prompt", "no prompt at all", base, "error"))
    files = {"empty.txt": b"", "blank.txt": b"\n \n\t\n", "binary.txt": bytes(rng.randrange(256) for _ in range(300)),
             "nul.txt": b"a red\x00circle\n", "latin1.txt": "caf\xe9 rouge\n".encode("latin-1"),
             "bad.jsonl": b'{"prompt": "a red circle"}\n{not json\n', "list.jsonl": b'["a red circle"]\n',
             "number.jsonl": b'{"prompt": 5}\n', "missing.jsonl": b'{"caption_text": "a"}\n',
             "nested.jsonl": b'{"prompt": {"text": "a"}}\n', "null.jsonl": b'{"prompt": null}\n',
             "empty.jsonl": b"", "huge.txt": b"x" * 50000 + b"\n", "bom.txt": "\ufeffa red circle\n".encode(),
             "crlf.txt": b"a red circle\r\na blue square\r\n", "utf16.txt": "a red circle\n".encode("utf-16")}
    for name, data in files.items():
        (folder / name).write_bytes(data)
        expect = "either" if name in ("bom.txt", "crlf.txt", "latin1.txt", "nul.txt") else "error"
        cases.append(Case("prompt", f"prompt file {name}", base + ["--prompts", str(folder / name)], expect))
    cases.append(Case("prompt", "prompt file that does not exist", base + ["--prompts", str(folder / "nope.txt")], "error"))
    cases.append(Case("prompt", "prompt file is a directory", base + ["--prompts", str(folder)], "error"))
    for flag, bad in [("--steps", "0"), ("--steps", "-3"), ("--steps", "abc"), ("--n", "0"), ("--seed", "1.5"),
                      ("--cfg", "nan"), ("--cfg", "1e30"), ("--cfg", "-2"), ("--batch-size", "0"),
                      ("--scheduler", "euler"), ("--step", "999"), ("--device", "tpu")]:
        cases.append(Case("prompt", f"sample {flag} {bad}", base + ["--prompt", "a red circle", flag, bad], "error"))
    return cases


def _png(width: int, height: int, mode: str = "RGB") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, (width, height), 128 if mode in ("L", "P", "I;16") else (200, 30, 30)[: len(mode)]).save(buf, "PNG")
    return buf.getvalue()


def _bomb_png(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming width x height, with one tiny IDAT (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def image_files(rng: random.Random) -> list[tuple[str, str, bytes, str]]:
    """(name, extension, bytes, expect) of odd and broken images."""
    from PIL import Image

    png, out = _png(24, 20), []
    jpg_buf = io.BytesIO()
    Image.new("RGB", (24, 20), (20, 200, 20)).save(jpg_buf, "JPEG")
    jpg = jpg_buf.getvalue()
    pixels_end = png.find(b"IEND") - 4  # a cut after this only loses the end marker: the pixels are intact
    for frac in (0.1, 0.2, 0.3, 0.5, 0.6, 0.7, 0.9, 0.98):
        cut = int(len(png) * frac)
        out.append((f"png cut at {frac:.0%}", "png", png[:cut], "error" if cut < pixels_end else "either"))
        out.append((f"jpeg cut at {frac:.0%}", "jpg", jpg[: int(len(jpg) * frac)], "error"))
    out += [("zero bytes", "png", b"", "error"), ("text named .png", "png", b"hello, I am not an image\n", "error"),
            ("random bytes", "jpg", bytes(rng.randrange(256) for _ in range(500)), "error"),
            ("png named .jpg", "jpg", png, "either"), ("jpeg named .png", "png", jpg, "either"),
            ("header claims 100000x100000", "png", _bomb_png(100000, 100000), "error"),
            ("header claims 30000x1", "png", _bomb_png(30000, 1), "error"),
            ("1x1 image", "png", _png(1, 1), "either"), ("grey image", "png", _png(20, 20, "L"), "either"),
            ("RGBA image", "png", _png(20, 20, "RGBA"), "either"), ("16-bit image", "png", _png(20, 20, "I;16"), "either")]
    cmyk = io.BytesIO()
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(cmyk, "JPEG")
    out.append(("CMYK jpeg", "jpg", cmyk.getvalue(), "either"))
    gif = io.BytesIO()
    frames = [Image.new("P", (20, 20), i * 40) for i in range(3)]
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    out.append(("animated gif", "gif", gif.getvalue(), "either"))
    palette = io.BytesIO()
    Image.new("P", (20, 20), 3).save(palette, "PNG", transparency=3)
    out.append(("palette with transparency", "png", palette.getvalue(), "either"))
    return out


def image_cases(ws: dict[str, Any], rng: random.Random) -> list[Case]:
    root, cases = ws["root"] / "imgs", []
    root.mkdir(exist_ok=True)
    for i, (name, ext, data, expect) in enumerate(image_files(rng)):
        path = root / f"i{i:03d}.{ext}"
        path.write_bytes(data)
        cases.append(Case("image", f"caption: {name}", ["caption", "--run", str(ws["run"]), str(path),
                                                        "--max-new-tokens", "3"], expect))
        src = root / f"src{i:03d}"
        src.mkdir()
        shutil.copy(path, src / f"a.{ext}")
        (src / "a.txt").write_text("a red circle")
        cases.append(Case("image", f"data folder: {name}", ["data", "folder", "--src", str(src), "--out",
                                                            str(root / f"out{i:03d}"), "--size", "16"], expect))
        mixed = root / f"mixed{i:03d}"
        shutil.copytree(src, mixed)
        (mixed / "b.png").write_bytes(_png(20, 20))
        (mixed / "b.txt").write_text("a blue square")
        cases.append(Case("image", f"data folder, one good image and {name}",
                          ["data", "folder", "--src", str(mixed), "--out", str(root / f"mout{i:03d}"), "--size", "16"],
                          "error" if expect == "error" else "either"))
    cases.append(Case("image", "caption: file does not exist", ["caption", "--run", str(ws["run"]), str(root / "no.png")],
                      "error"))
    empty = root / "emptysrc"
    empty.mkdir()
    cases.append(Case("image", "data folder: no images", ["data", "folder", "--src", str(empty), "--out",
                                                          str(root / "eout"), "--size", "16"], "error"))
    return cases


def metadata_cases(ws: dict[str, Any], rng: random.Random) -> list[Case]:
    rows = (ws["images"] / "metadata.jsonl").read_text().splitlines()
    good = json.loads(rows[0])
    bad_lines = ["{not json", "[1, 2]", "42", '"a string"', json.dumps({"text": "no file"}),
                 json.dumps({**good, "file_name": 5}), json.dumps({**good, "file_name": None}),
                 json.dumps({**good, "file_name": "../../etc/passwd"}), json.dumps({**good, "file_name": "missing.png"}),
                 json.dumps({**good, "text": None}), json.dumps({**good, "text": ["a", "b"]}), json.dumps({**good, "text": 7}),
                 json.dumps({**good, "split": 3}), json.dumps({**good, "split": "test"}), "\x00\x00", "{}",
                 json.dumps({**good, "file_name": ""}), json.dumps({**good, "file_name": "images"})]
    cases = []
    for i, line in enumerate(bad_lines):
        for where in ("first", "middle", "only"):
            folder = ws["root"] / f"meta{i}_{where}"
            shutil.copytree(ws["images"], folder)
            lines = rows[:]
            if where == "first":
                lines[0] = line
            elif where == "middle":
                lines.insert(len(lines) // 2, line)
            else:
                lines = [line]
            (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
            expect = "either" if where != "only" and line.startswith("{") and "file_name" in line else "error"
            cases.append(Case("metadata", f"vae encode, {where} line {line[:40]!r}",
                              ["vae", "encode", "--vae", str(ws["vae"]), "--data", str(folder), "--out",
                               str(folder / "latents")], expect))
            cases.append(Case("metadata", f"train on a folder, {where} line {line[:40]!r}",
                              ["train", "--config", str(ws["root"] / "config.yaml"), "--out", str(folder / "run"),
                               "--data", str(folder), "--set", "data.kind=folder", "--set", "data.split=null",
                               "--max-steps", "1", "--no-progress"], expect))
    return cases


def cache_cases(ws: dict[str, Any], rng: random.Random) -> list[Case]:
    src, cases = ws["latents"], []
    shards = sorted(src.glob("latents-*.safetensors"))

    def variant(name: str, damage) -> None:
        folder = ws["root"] / f"cache{len(cases)}"
        shutil.copytree(src, folder)
        damage(folder)
        cases.append(Case("latent cache", name, ["train", "--config", str(ws["root"] / "config.yaml"), "--out",
                                                 str(folder / "run"), "--data", str(folder), "--max-steps", "1",
                                                 "--no-progress"], "error"))

    for shard in (shards[0].name, shards[-1].name, shards[0].name.replace(".safetensors", ".jsonl")):
        for frac in (0.0, 0.05, 0.25, 0.5, 0.75, 0.95):
            variant(f"{shard} cut at {frac:.0%}", lambda f, s=shard, q=frac: (f / s).write_bytes(
                (f / s).read_bytes()[: int((f / s).stat().st_size * q)]))
        variant(f"{shard} missing", lambda f, s=shard: (f / s).unlink())
        variant(f"{shard} with flipped bytes", lambda f, s=shard: _flip_tail(f / s))
    if len(shards) > 1:
        def swap(folder: Path) -> None:
            a, b = folder / shards[0].name, folder / shards[1].name
            data_a, data_b = a.read_bytes(), b.read_bytes()
            a.write_bytes(data_b)
            b.write_bytes(data_a)
        variant("two shards swapped", swap)
    index_edits = {"index.json not JSON": lambda i: "{broken", "index.json a list": lambda i: "[]",
                   "index.json without shards": lambda i: json.dumps({k: v for k, v in i.items() if k != "shards"}),
                   "index.json counts wrong": lambda i: json.dumps({**i, "shards": [{**s, "count": s["count"] + 5}
                                                                                    for s in i["shards"]]}),
                   "latent shape 8 channels": lambda i: json.dumps({**i, "latent_shape": [8, 8, 8]}),
                   "latent shape odd size": lambda i: json.dumps({**i, "latent_shape": [4, 7, 7]}),
                   "index.json empty": lambda i: ""}
    for name, edit in index_edits.items():
        variant(name, lambda f, e=edit: (f / "index.json").write_text(e(json.loads((f / "index.json").read_text()))))
    variant("index.json missing", lambda f: (f / "index.json").unlink())
    return cases


def _flip_tail(path: Path, n: int = 20) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-n] + bytes(255 - x for x in data[-n:]))


def checkpoint_cases(ws: dict[str, Any], rng: random.Random) -> list[Case]:
    cases = []
    steps = [path for _, path in RunDir(ws["run"]).checkpoints()]
    latest = steps[-1].name

    def variant(name: str, damage, expect_resume: str) -> None:
        run = ws["root"] / f"ck{len(cases)}"
        shutil.copytree(ws["run"], run)
        damage(RunDir(run).checkpoints_dir)
        cases.append(Case("checkpoint", f"sample: {name}", ["sample", "--run", str(run), "--prompt", "a red circle",
                                                            "--steps", "1", "--out", str(run / "s")], "error"))
        cases.append(Case("checkpoint", f"resume: {name}", ["train", "--out", str(run), "--resume", "--max-steps", "3",
                                                            "--no-progress"], expect_resume))

    files = sorted(p.name for p in steps[-1].iterdir())
    for file in files:
        for frac in (0.0, 0.25, 0.5, 0.75, 0.99):
            variant(f"{file} cut at {frac:.0%}", lambda c, f=file, q=frac: (c / latest / f).write_bytes(
                (c / latest / f).read_bytes()[: int((c / latest / f).stat().st_size * q)]), "either")
        variant(f"{file} missing", lambda c, f=file: (c / latest / f).unlink(), "either")
    if len(steps) > 1:
        variant("model weights of two steps swapped", lambda c: (
            shutil.copy(c / steps[0].name / MODEL_FILE, c / latest / MODEL_FILE)), "either")

        def every(c: Path) -> None:
            for s in steps:
                (c / s.name / EMA_FILE).write_bytes(b"")
        variant("every checkpoint damaged", every, "error")
    variant(f"{STATE_FILE} not JSON", lambda c: (c / latest / STATE_FILE).write_text("{"), "either")
    variant("weights of another model", lambda c: _other_model_weights(c / latest), "either")
    return cases


def _other_model_weights(checkpoint: Path) -> None:
    """Replace the weights by a wider model's, with a manifest that matches them (files that are intact but
    belong to another model: only the shapes can tell)."""
    from safetensors.torch import save_file

    from transfusion_mot.common.files import file_manifest
    from transfusion_mot.config import ModelConfig
    from transfusion_mot.model import TransfusionMoT

    state = json.loads((checkpoint / STATE_FILE).read_text())
    model = TransfusionMoT(ModelConfig(dim=48, n_layers=2, n_heads=2, ffn_dim=64, max_seq_len=96))
    for name in (MODEL_FILE, EMA_FILE):
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint / name))
    state["files"] = file_manifest(checkpoint, exclude=(STATE_FILE,))
    (checkpoint / STATE_FILE).write_text(json.dumps(state))


def shard_cases(ws: dict[str, Any], rng: random.Random) -> list[Case]:
    data, cases = ws["shard"].read_bytes(), []
    for frac in (0.0, 0.01, 0.03, 0.1, 0.2, 0.33, 0.5, 0.66, 0.77, 0.9, 0.95, 0.999):
        path = ws["root"] / f"cut{int(frac * 1000):04d}.tar"
        path.write_bytes(data[: int(len(data) * frac)])
        cases.append(Case("webdataset", f"shard cut at {frac:.1%}", [
            "train", "--config", str(ws["root"] / "config.yaml"), "--out", str(ws["root"] / f"wds{len(cases)}"),
            "--data", str(path), "--set", "data.kind=webdataset", "--set", "data.num_workers=0", "--max-steps", "1",
            "--no-progress"], "error" if frac < 0.05 else "either"))
    cases.append(Case("webdataset", "shard pattern that matches nothing", [
        "train", "--config", str(ws["root"] / "config.yaml"), "--out", str(ws["root"] / "wdsnone"), "--data",
        str(ws["root"] / "none-{000..003}.tar"), "--set", "data.kind=webdataset", "--max-steps", "1", "--no-progress"],
        "error"))
    return cases


FAMILIES = {"config": config_cases, "prompt": prompt_cases, "image": image_cases, "metadata": metadata_cases,
            "latent cache": cache_cases, "checkpoint": checkpoint_cases, "webdataset": shard_cases}


# --------------------------------------------------------------------------------------------------
# running and judging


def run_case(case: Case) -> tuple[str, str]:
    """(verdict, evidence) of one case, run in this process."""
    from transfusion_mot.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            rc = main(case.argv)
        except SystemExit as exit_:  # argparse
            rc = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException:  # noqa: BLE001 - an escaped exception is exactly what the fuzzer looks for
            return "traceback", traceback.format_exc(limit=3).strip().splitlines()[-1]
    # what the command said, without progress bars (tqdm redraws with carriage returns) and warnings
    said = [part for ln in err.getvalue().splitlines() for part in ln.split("\r")]
    lines = [ln for ln in said if ln.strip() and not ln.startswith("warning") and "Warning" not in ln
             and not ln.startswith("  ") and not PROGRESS.search(ln)]
    reported = bool(caught) or "skipped" in out.getvalue() or "warning" in err.getvalue().lower()
    if rc:
        return ("clean error", lines[0]) if len(lines) == 1 else ("traceback", " | ".join(lines[-3:]))
    if reported:
        return "handled and reported", "exit 0, reported"
    return ("silent success", "exit 0") if case.expect == "error" else ("ok", "exit 0")


def stratified(cases: list[Case], n: int) -> list[Case]:
    """n cases spread evenly within each family, every family at least once (the default tests' sample)."""
    families: dict[str, list[Case]] = {}
    for case in cases:
        families.setdefault(case.family, []).append(case)
    quota = {f: max(1, n * len(c) // len(cases)) for f, c in families.items()}
    largest = max(families, key=lambda f: len(families[f]))
    quota[largest] += n - sum(quota.values())
    return [c[int(i * len(c) / quota[f])] for f, c in families.items() for i in range(quota[f])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sample", type=int, default=0, help="run only this many cases, spread over the families")
    ap.add_argument("--family", action="append", default=[], choices=list(FAMILIES))
    ap.add_argument("--show", type=int, default=5, help="cases to print per bad verdict")
    ap.add_argument("--workspace", default=None, help="keep the workspace here (default: a temporary directory)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="tmot-fuzz-") if args.workspace is None else args.workspace
    try:
        ws = build_workspace(Path(tmp))
        cases = [c for name, make in FAMILIES.items() if not args.family or name in args.family for c in make(ws, rng)]
        if args.sample and args.sample < len(cases):
            cases = stratified(cases, args.sample)
        results: dict[str, Counter] = {}
        bad: dict[str, list[str]] = {"traceback": [], "silent success": []}
        for case in cases:
            verdict, evidence = run_case(case)
            results.setdefault(case.family, Counter())[verdict] += 1
            if verdict in bad:
                bad[verdict].append(f"[{case.family}] {case.name}: {evidence}")
    finally:
        if args.workspace is None:
            shutil.rmtree(tmp, ignore_errors=True)
    totals = Counter()
    for counts in results.values():
        totals.update(counts)
    print(f"| family | cases | {' | '.join(VERDICTS)} |")
    print("|---|---|" + "---|" * len(VERDICTS))
    for family, counts in list(results.items()) + [("all", totals)]:
        print(f"| {family} | {sum(counts.values())} | " + " | ".join(str(counts.get(v, 0)) for v in VERDICTS) + " |")
    for verdict, items in bad.items():
        for item in items[: args.show]:
            print(f"{verdict}: {item}", file=sys.stderr)
    print(json.dumps({"benchmark": "fuzz_inputs", "cases": sum(totals.values()), **{v.replace(" ", "_"): totals.get(v, 0)
                                                                                  for v in VERDICTS},
                      "families": {f: dict(c) for f, c in results.items()}, "seed": args.seed,
                      "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
