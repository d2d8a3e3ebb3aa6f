"""LMFusion in miniature on a CPU: start from a pretrained language model, keep its text, learn images.

1. The "pretrained LLM" a user brings: a small Llama-architecture LM (grouped-query attention) pretrained
   here with transformers on WordNet's glosses (`tmot data corpus`), with its own byte-level BPE
   tokenizer, saved with save_pretrained (OUT/lm).
2. Five variants trained for the same steps on the built-in shapes data plus the corpus as text-only
   documents (`--text-ratio` of the samples), same data order and seeds, evaluated on the same fixed
   held-out draws (images, captioning, and the corpus' held-out documents, from step 0):
     lmfusion       MoT from the LM, text frozen, image experts copies of the text experts (LMFusion)
     mot_ft         MoT from the LM, nothing frozen
     dense_ft       the dense model from the LM, every weight trained (it must change the LM's weights)
     scratch_mot    MoT from scratch (copied experts: MoT = dense at step 0)
     scratch_dense  dense from scratch
   The from-scratch models have the LM's shape and tokenizer, so every number is per the same tokens.
3. Alignment (the shapes classifier) and FID at equal n per variant and seed (`tmot eval bench`).

Writes OUT/results.md (table), OUT/results.json, OUT/curves.png; the last stdout line is one JSON object with
lm_corpus_loss (the LM's own held-out corpus loss), <variant>_corpus_loss, <variant>_val_image_loss,
<variant>_val_caption_loss, <variant>_all_correct, <variant>_fid (means over seeds, `*_std` beside them).

    python benchmarks/lmfusion.py --steps 40      # a check that it all runs (about 10-15 minutes here)
    python benchmarks/lmfusion.py --steps 1000    # the measurement: three seeds, LM 1000 steps

Below 500 steps it is a check, not a measurement: one seed, 64 images per bench, a 300-step shapes
classifier and FID against 256 validation images (a measurement: 256 images, 1000 steps, the whole split).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from mot_vs_dense import bench_variant, mean_sd_cell, mean_std, reference_stats  # noqa: E402  (the same bench, statistics)

from transfusion_mot.run_dir import RunDir

VARIANTS = {
    "lmfusion": {"from_lm": True, "untie": ["attn", "ffn", "norm"], "freeze": ["text"]},
    "mot_ft": {"from_lm": True, "untie": ["attn", "ffn", "norm"], "freeze": []},
    "dense_ft": {"from_lm": True, "untie": [], "freeze": []},
    "scratch_mot": {"from_lm": False, "untie": ["attn", "ffn", "norm"], "freeze": []},
    "scratch_dense": {"from_lm": False, "untie": [], "freeze": []},
}
SPECIALS = ("<s>", "</s>", "<pad>")
MAX_SEQ_LEN = 512


# --------------------------------------------------------------------------------------------------
# 1. the language model a user would bring


def train_lm_tokenizer(texts: list[str], vocab_size: int, out: Path):
    """A byte-level BPE of the corpus as a transformers tokenizer that starts documents with <s> (Llama's
    convention) and ends them with </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(str(out))
    return fast


@torch.no_grad()
def lm_document_loss(lm_dir: Path, val_path: Path, n: int, max_text: int, appended: int = 0) -> float:
    """The LM's own mean next-token loss per token, computed by transformers, on the documents the runs hold
    out (the same evenly spaced n, cut to the same length) laid out as the runs lay them out (BOS text EOS,
    one per row). A run appends `appended` rows (BOI, EOI) to the vocabulary that start as the mean of the
    LM's rows, so their logit is the mean logit: with them in the softmax this is the run's step-0 number
    exactly (and LMFusion's at every evaluation, but for what training taught the appended rows)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transfusion_mot.data.streams import held_out_documents

    lm, tokenizer = AutoModelForCausalLM.from_pretrained(str(lm_dir)).eval(), AutoTokenizer.from_pretrained(str(lm_dir))
    docs = held_out_documents(val_path, n)
    nll = count = 0.0
    for start in range(0, len(docs), 32):
        rows = [[tokenizer.bos_token_id, *tokenizer(d, add_special_tokens=False)["input_ids"][:max_text],
                 tokenizer.eos_token_id] for d in docs[start:start + 32]]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), tokenizer.pad_token_id)
        labels = torch.full((len(rows), width), -100)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row)
            labels[i, :len(row)] = torch.tensor(row)
        logits = lm(ids, attention_mask=(labels != -100).long()).logits[:, :-1].float()
        logits = torch.cat([logits, logits.mean(-1, keepdim=True).expand(*logits.shape[:-1], appended)], -1)
        target = labels[:, 1:]
        nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                 ignore_index=-100, reduction="sum").item()
        count += int((target != -100).sum())
    return nll / count


def pretrain_lm(corpus: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """OUT/lm: tokenizer + LlamaForCausalLM pretrained on the corpus' training documents (packed blocks of
    `--lm-block` tokens, AdamW, warm-up then cosine), and its held-out corpus loss."""
    from transformers import LlamaConfig, LlamaForCausalLM

    info_path = out / "pretraining.json"
    settings = {k: getattr(args, k) for k in ("lm_steps", "lm_dim", "lm_layers", "lm_vocab", "lm_block", "lm_batch",
                                              "lm_lr")}
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    if info.get("settings") == settings:
        return info  # pretrained earlier with the same settings: reuse
    # a new LM: first forget the old one and every run that started from it (an interrupted pretraining then
    # leaves no pretraining.json, so the next benchmark pretrains again)
    info_path.unlink(missing_ok=True)
    shutil.rmtree(out.parent / "runs", ignore_errors=True)
    train_docs = (corpus / "train.txt").read_text().splitlines()
    t0 = time.perf_counter()
    tokenizer = train_lm_tokenizer(train_docs, args.lm_vocab, out)
    stream = [i for doc in train_docs for i in tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id]]
    block, batch = args.lm_block, args.lm_batch
    blocks = torch.tensor(stream[: len(stream) // block * block]).view(-1, block)
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.lm_dim, num_hidden_layers=args.lm_layers, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=int(args.lm_dim * 8 / 3 // 8 * 8), max_position_embeddings=512,
        rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    opt = torch.optim.AdamW(lm.parameters(), lr=args.lm_lr, betas=(0.9, 0.95), weight_decay=0.1)
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(0))
    warmup = max(1, args.lm_steps // 20)
    lm.train()
    for step in range(args.lm_steps):
        lr = args.lm_lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / args.lm_steps))
        for group in opt.param_groups:
            group["lr"] = lr
        rows = blocks[order[(step * batch + torch.arange(batch)) % len(blocks)]]
        loss = lm(rows, labels=rows).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % max(1, args.lm_steps // 10) == 0:
            print(f"[lmfusion] LM step {step}: loss {loss.item():.3f}", file=sys.stderr, flush=True)
    lm.eval().save_pretrained(str(out))
    info = {"steps": args.lm_steps, "tokens_seen": args.lm_steps * batch * block, "corpus_tokens": len(stream),
            "params": sum(p.numel() for p in lm.parameters()), "seconds": round(time.perf_counter() - t0, 1),
            "vocab": len(tokenizer), "settings": settings}
    info_path.write_text(json.dumps(info, indent=2))
    return info


# --------------------------------------------------------------------------------------------------
# 2. the variants


def variant_config(name: str, lm: Path, data: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The training config of one variant: shapes-tiny's recipe with the LM's shape (and, from the LM, its
    weights and tokenizer), the corpus mixed in, and held-out corpus documents."""
    spec = VARIANTS[name]
    base = yaml.safe_load((REPO / "configs/train/shapes-tiny.yaml").read_text())
    image = {"latent_channels": 4, "patch_size": 2, "max_seq_len": MAX_SEQ_LEN, "objective": "flow",
             "time_conditioning": "add",
             "untie": spec["untie"], "expert_init": "copy"}
    if spec["from_lm"]:
        model, tokenizer = {"init_from": str(lm), **image}, {"kind": "pretrained", "max_text_tokens": 32}
    else:
        from transfusion_mot.tokenizer import HFTokenizer

        lm_config = json.loads((lm / "config.json").read_text())
        model = {"dim": lm_config["hidden_size"], "n_layers": lm_config["num_hidden_layers"],
                 "n_heads": lm_config["num_attention_heads"], "n_kv_heads": lm_config["num_key_value_heads"],
                 "ffn_dim": lm_config["intermediate_size"],
                 "vocab_size": HFTokenizer(lm / "tokenizer.json").vocab_size, "qk_norm": False,
                 "norm_eps": lm_config["rms_norm_eps"], "rope_theta": 10000.0, **image}
        tokenizer = {"kind": "hf", "path": str(lm / "tokenizer.json"), "max_text_tokens": 32}
    return {**base, "model": model, "tokenizer": tokenizer,
            "data": {**base["data"], "path": data["data"], "val_path": data["val"], "builtin": None,
                     "text_only_path": str(data["corpus"] / "train.txt"), "text_only_ratio": args.text_ratio,
                     "text_val_path": str(data["corpus"] / "val.txt")},
            "vae": {"path": data["vae"]},
            "optim": {**base["optim"], "lr": args.lr},
            "train": {**base["train"], "max_steps": args.steps, "freeze": spec["freeze"], "eval_every": args.eval_every,
                      "eval_samples": args.eval_samples, "save_every": args.steps, "tensorboard": False,
                      "progress": False, "precision": "fp32"}}


def train_variant(name: str, seed: int, lm: Path, data: dict[str, Any], args: argparse.Namespace, out: Path) -> Path:
    run = out / "runs" / f"{name}-s{seed}"
    config = out / "configs" / f"{run.name}.yaml"  # one per run: the config it was trained from
    variant = variant_config(name, lm, data, args)
    text = yaml.safe_dump({**variant, "train": {**variant["train"], "seed": seed}}, sort_keys=False)
    if RunDir(run).read_summary().get("step") == args.steps and config.is_file() and config.read_text() == text:
        return run  # trained earlier from the same config: reuse
    shutil.rmtree(run, ignore_errors=True)  # before the config is written: a run never outlives its config
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(text)
    cmd = [sys.executable, "-m", "transfusion_mot", "train", "--config", str(config), "--out", str(run)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)}, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"training {run.name} failed:\n{proc.stderr[-3000:]}")
    print(f"[lmfusion] {run.name}: {args.steps} steps in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return run


def run_numbers(run: Path) -> dict[str, Any]:
    evals = [r for r in RunDir(run).read_metrics() if "val_image_loss" in r]
    summary = RunDir(run).read_summary()
    first, last = evals[0], evals[-1]
    return {"corpus_loss_start": first["val_corpus_loss"], "corpus_loss": last["val_corpus_loss"],
            "val_image_loss": last["val_image_loss"], "val_caption_loss": last["val_caption_loss"],
            "val_text_loss": last["val_text_loss"], "params": summary["parameters"]["total"],
            "trainable": summary["trainable_parameters"], "train_time_s": round(summary["train_time_s"], 1)}


def render(result: dict[str, Any], args: argparse.Namespace) -> str:
    lm = result["lm"]
    lines = [f"### LMFusion in miniature: {args.steps} steps on shapes + {args.text_ratio:.0%} corpus documents, "
             f"mean ± sd over seeds {', '.join(map(str, args.seeds))}", "",
             f"The language model: Llama architecture, {lm['params']:,} parameters, pretrained {lm['steps']} steps "
             f"({lm['tokens_seen']:,} tokens) on WordNet glosses in {lm['seconds']:.0f} s; its held-out corpus loss "
             f"{lm['val_corpus_loss']:.4f} (transformers)" + (
                 f"; with the {lm['appended_rows']} rows a run appends (BOI, EOI) at their start, the mean of the "
                 f"LM's rows, in the softmax: {lm['val_corpus_loss_appended']:.6f}, the runs' step-0 loss"
                 if "appended_rows" in lm else "") + ".", "",
             "| variant | params (trained) | corpus loss: start -> end | val image loss | val caption loss | colour | "
             "shape | all correct | FID | train s |", "|" + "---|" * 10]

    ms = mean_sd_cell
    for name, v in result["variants"].items():
        lines.append(f"| {name} | {v['params']:,.0f} ({v['trainable']:,.0f}) | {v['corpus_loss_start']:.4f} -> "
                     f"{ms(v, 'corpus_loss')} | {ms(v, 'val_image_loss')} | {ms(v, 'val_caption_loss')} | "
                     f"{ms(v, 'align_colour', '.1f', 100)} | {ms(v, 'align_shape', '.1f', 100)} | "
                     f"{ms(v, 'align_all_correct', '.1f', 100)} | {ms(v, 'fid', '.1f')} | {v['train_time_s']:.0f} |")
    lines += ["", f"Alignment and FID on {args.bench_n} images per variant and seed (validation captions, equal n)."]
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1000, help="training steps of every variant")
    ap.add_argument("--seeds", default=None, help="comma-separated training seeds (default 0,1,2; 0 below 500 steps, "
                    "a check that the whole benchmark runs)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--lm-steps", type=int, default=None, help="LM pretraining steps (default min(3000, 10 x steps))")
    ap.add_argument("--lm-dim", type=int, default=128)
    ap.add_argument("--lm-layers", type=int, default=4)
    ap.add_argument("--lm-vocab", type=int, default=2048)
    ap.add_argument("--lm-block", type=int, default=128, help="tokens per pretraining row")
    ap.add_argument("--lm-batch", type=int, default=32)
    ap.add_argument("--lm-lr", type=float, default=2e-3)
    ap.add_argument("--lr", type=float, default=2e-3, help="learning rate of every variant (shapes-tiny's)")
    ap.add_argument("--text-ratio", type=float, default=0.3, help="share of samples that are corpus documents")
    ap.add_argument("--eval-every", type=int, default=None, help="default: steps / 10")
    ap.add_argument("--eval-samples", type=int, default=256)
    ap.add_argument("--bench-n", type=int, default=None, help="images per variant and seed for alignment and FID "
                    "(default 256; 64 below 500 steps)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="lmfusion")
    args = ap.parse_args()
    args.seeds = [int(s) for s in (args.seeds or ("0,1,2" if args.steps >= 500 else "0")).split(",") if s.strip()]
    args.names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in args.names if n not in VARIANTS]
    if unknown or not args.seeds:
        raise SystemExit(f"unknown variant {unknown[0]!r} (choose from {', '.join(VARIANTS)})" if unknown
                         else "--seeds: give at least one seed")
    args.eval_every = args.eval_every or max(1, args.steps // 10)
    args.lm_steps = args.lm_steps or min(3000, 10 * args.steps)
    args.bench_n = args.bench_n if args.bench_n is not None else (256 if args.steps >= 500 else 64)
    return args


def prepare(args: argparse.Namespace, out: Path) -> tuple[dict[str, Any], Path, dict[str, Any]]:
    """(the data every variant trains on, the pretrained LM's directory, what the LM is): the built-in shapes
    data, WordNet's corpus, and the LM pretrained on it."""
    from transfusion_mot.config import load_run_config
    from transfusion_mot.data.corpus import build_corpus
    from transfusion_mot.recipes.prepare import prepare_for_run

    corpus = out / "corpus"
    if not (corpus / "info.json").is_file():
        build_corpus(corpus)
    config = load_run_config(REPO / "configs/train/shapes-tiny.yaml")
    prepared = prepare_for_run(config, progress=False)
    data = {"data": config.data.path, "val": config.data.val_path, "vae": config.vae.path,
            "images": str(prepared.data_dir), "corpus": corpus.resolve()}
    lm_dir = out / "lm"
    lm_info = pretrain_lm(corpus, lm_dir, args)
    lm_info["val_corpus_loss"] = lm_document_loss(lm_dir, corpus / "val.txt", args.eval_samples, MAX_SEQ_LEN - 2)
    print(f"[lmfusion] LM ready: {lm_info}", file=sys.stderr, flush=True)
    return data, lm_dir, lm_info


def bench_all(args: argparse.Namespace, out: Path, data: dict[str, Any], run_dirs: dict, jobs: list) -> dict:
    """Alignment and FID of every run, at equal n (a smaller classifier and FID reference for a check run)."""
    if not args.bench_n:
        return {}
    check = args.steps < 500
    classifier = out / ("shapes-classifier-check" if check else "shapes-classifier")
    if not (classifier / "config.json").is_file():
        from eval.align import train_shapes_classifier

        train_shapes_classifier(classifier, image_size=32, steps=300 if check else 1000, seed=0,
                                eval_images=500 if check else 2000)
    stats = reference_stats(data["images"], out, limit=256 if check else None)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        return dict(zip(jobs, pool.map(lambda j: bench_variant(run_dirs[j], j[1], data, args, classifier, stats),
                                       jobs)))


def aggregate(args: argparse.Namespace, run_dirs: dict, benches: dict) -> tuple[dict[str, Any], dict[str, Any]]:
    """(mean and sd over seeds of every number, per variant; the numbers of every seed)."""
    variants: dict[str, Any] = {}
    per_seed: dict[str, dict[int, Any]] = {}
    for name in args.names:
        rows = {seed: {**run_numbers(run_dirs[name, seed]), **benches.get((name, seed), {})} for seed in args.seeds}
        per_seed[name] = rows
        merged: dict[str, Any] = dict(rows[args.seeds[0]])
        for key, value in list(merged.items()):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                merged[key], merged[f"{key}_std"] = mean_std([r[key] for r in rows.values() if r.get(key) is not None])
        variants[name] = merged
    return variants, per_seed


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    torch.set_num_threads(max(1, args.threads * args.jobs))
    data, lm_dir, lm_info = prepare(args, out)
    jobs = [(name, seed) for seed in args.seeds for name in args.names]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        run_dirs = dict(zip(jobs, pool.map(lambda j: train_variant(j[0], j[1], lm_dir.resolve(), data, args, out),
                                           jobs)))

    from transfusion_mot.training.curves import plot_curves

    first_from_lm = next((n for n in args.names if VARIANTS[n]["from_lm"]), None)
    if first_from_lm:  # the LM's number with the run's appended rows (BOI, EOI) at their start: its step-0 number
        model = RunDir(run_dirs[first_from_lm, args.seeds[0]]).load_config().model
        lm_info["appended_rows"] = model.vocab_size - model.base_vocab_size
        lm_info["val_corpus_loss_appended"] = lm_document_loss(lm_dir, Path(data["corpus"]) / "val.txt",
                                                               args.eval_samples, MAX_SEQ_LEN - 2,
                                                               lm_info["appended_rows"])
    variants, per_seed = aggregate(args, run_dirs, bench_all(args, out, data, run_dirs, jobs))
    result = {"lm": lm_info, "variants": variants, "per_seed": per_seed}
    panels = (("held-out image loss", ("val_image_loss",)), ("held-out captioning loss", ("val_caption_loss",)),
              ("held-out corpus loss (the LM's text)", ("val_corpus_loss",)))
    first_seed = {name: RunDir(run_dirs[name, args.seeds[0]]).read_metrics() for name in args.names}
    plot_curves(first_seed, out / "curves.png", panels=panels, x_axes=("step",),
                title=f"LMFusion in miniature, seed {args.seeds[0]}")
    headline = {"lm_corpus_loss": lm_info["val_corpus_loss"],
                "lm_corpus_loss_in_runs": variants[first_from_lm]["corpus_loss_start"] if first_from_lm else None}
    for name, v in variants.items():
        for key, out_key in (("corpus_loss", "corpus_loss"), ("val_image_loss", "val_image_loss"),
                             ("val_caption_loss", "val_caption_loss"), ("align_all_correct", "all_correct"),
                             ("fid", "fid")):
            headline[f"{name}_{out_key}"] = v.get(key)
            headline[f"{name}_{out_key}_std"] = v.get(f"{key}_std")
    result.update({"headline": headline, "steps": args.steps, "seeds": args.seeds, "bench_n": args.bench_n,
                   "text_ratio": args.text_ratio, "lr": args.lr, "jobs": args.jobs, "threads": args.threads,
                   "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
                   "wall_s": round(time.perf_counter() - t0, 1),
                   "command": " ".join(["python benchmarks/lmfusion.py", *sys.argv[1:]])})
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "results.md").write_text(render(result, args) + f"\n![curves](curves.png)\n\n`{result['command']}`\n")
    print((out / "results.md").read_text())
    print(json.dumps({**headline, "steps": args.steps, "seeds": args.seeds, "wall_s": result["wall_s"],
                      "out": str(out)}))


if __name__ == "__main__":
    main()
