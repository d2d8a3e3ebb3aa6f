"""MoT versus its dense baseline on embedded synthetic latents, side by side on the CPU (a quick check of the
core: `python benchmarks/mot_vs_dense.py`; `tmot demo` is the full pipeline in demo.py).

The two models come from the same code (untie = {attn, ffn, norm} versus empty), see the same batches in
the same order with the same noise, and are trained with the same optimiser. The data is generated here:
each caption names a colour and a pattern, and its "image" is a 4x8x8 latent whose channels encode them
(plus per-sample noise), so both the LM loss and the diffusion loss have something to learn.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .accounting import parameter_accounting
from .batch import Collator, Sample
from .config import ModelConfig
from .diffusion import make_objective
from .losses import transfusion_loss
from .model import TransfusionMoT

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
PATTERNS = ["stripes", "dots", "checks", "plain"]


def synthetic_pairs(n: int, latent: int, seed: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    colour_codes = torch.randn(len(COLOURS), 4, 1, 1, generator=g)
    yy, xx = torch.meshgrid(torch.arange(latent), torch.arange(latent), indexing="ij")
    pattern_maps = torch.stack([(yy % 2).float(), ((yy + xx) % 3 == 0).float(), ((yy // 2 + xx // 2) % 2).float(),
                                torch.zeros(latent, latent)]) * 2 - 1
    pairs = []
    for _ in range(n):
        c = int(torch.randint(len(COLOURS), (1,), generator=g))
        p = int(torch.randint(len(PATTERNS), (1,), generator=g))
        z = colour_codes[c] + 0.5 * pattern_maps[p] + 0.1 * torch.randn(4, latent, latent, generator=g)
        pairs.append((f"a {COLOURS[c]} square with {PATTERNS[p]}", z))
    return pairs


def to_sample(caption: str, latent: torch.Tensor, image_first: bool) -> Sample:
    ids = list(caption.encode("utf-8"))  # byte-level tokens: ids 0-255, specials are 256-260
    return Sample([latent, ids] if image_first else [ids, latent])


def run_core_demo(out: str | Path, steps: int = 400, batch_size: int = 8, seed: int = 0,
                  config_path: str | Path | None = None) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    base = ModelConfig.from_yaml(config_path) if config_path else ModelConfig(
        dim=128, n_layers=4, n_heads=4, ffn_dim=344, vocab_size=261, max_seq_len=128)
    configs = {"mot": dataclasses.replace(base, untie=["attn", "ffn", "norm"]),
               "dense": dataclasses.replace(base, untie=[])}
    train = synthetic_pairs(steps * batch_size, 8, seed)
    held_out = synthetic_pairs(64, 8, seed + 1)
    report: dict = {"steps": steps, "batch_size": batch_size, "seed": seed, "models": {}}
    metrics = (out / "metrics.jsonl").open("w")
    for name, cfg in configs.items():
        torch.manual_seed(seed)
        model = TransfusionMoT(cfg)
        objective = make_objective(cfg)
        collator = Collator(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
        gen = torch.Generator().manual_seed(seed)
        flip = torch.Generator().manual_seed(seed + 7)
        start = time.perf_counter()
        tokens_seen = 0
        bar = tqdm(range(steps), desc=f"demo {name}", unit="step")
        for step in bar:
            chunk = train[step * batch_size:(step + 1) * batch_size]
            firsts = (torch.rand(len(chunk), generator=flip) < 0.2).tolist()  # 20% image-first
            batch = collator.collate_padded([to_sample(c, z, f) for (c, z), f in zip(chunk, firsts)])
            losses = transfusion_loss(model, batch, objective, gen)
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            tokens_seen += int((batch.doc_ids >= 0).sum())
            row = {"model": name, "step": step + 1, **{k: round(v.item(), 5) for k, v in losses.items()},
                   "lr": sched.get_last_lr()[0], "tokens_per_s": round(tokens_seen / (time.perf_counter() - start), 1)}
            metrics.write(json.dumps(row) + "\n")
            bar.set_postfix(text=f"{row['text_loss']:.3f}", image=f"{row['image_loss']:.3f}")
        elapsed = time.perf_counter() - start
        model.eval()
        with torch.no_grad():  # held-out losses averaged over 8 draws of timesteps and noise
            val_batch = collator.collate_padded([to_sample(c, z, False) for c, z in held_out])
            draws = [transfusion_loss(model, val_batch, objective, torch.Generator().manual_seed(seed + 100 + i))
                     for i in range(8)]
            val = {k: torch.stack([d[k] for d in draws]).mean() for k in draws[0]}
        report["models"][name] = {
            "untie": cfg.untie,
            "held_out": {k: round(v.item(), 4) for k, v in val.items()},
            "train_seconds": round(elapsed, 1),
            "tokens_per_s": round(tokens_seen / elapsed, 1),
            "accounting": parameter_accounting(model, seq_len=val_batch.tokens.shape[1]),
        }
    metrics.close()
    (out / "report.json").write_text(json.dumps(report, indent=2))
    lines = ["# tmot demo (core): MoT versus dense", "",
             f"{steps} steps, batch {batch_size}, seed {seed}, synthetic colour/pattern captions with 4x8x8 latents.", "",
             "| model | untie | params | active/token (text, image) | held-out text loss | held-out image loss | tokens/s |",
             "|---|---|---|---|---|---|---|"]
    for name, r in report["models"].items():
        acc = r["accounting"]
        act = acc["active_params_per_token"]
        lines.append(f"| {name} | {','.join(r['untie']) or '-'} | {acc['total_params']:,} | {act['text']:,}, {act['image']:,} | "
                     f"{r['held_out']['text_loss']:.4f} | {r['held_out']['image_loss']:.4f} | {r['tokens_per_s']:.0f} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return report
