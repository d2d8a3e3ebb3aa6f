"""The model card of an exported pipeline (README.md with the Hub's YAML metadata), and the facts it states,
read from the run directory that trained the model: its config, its summary (parameters, steps, tokens,
held-out losses) and its evaluation (what `tmot demo` measured: alignment, FID), when present."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..common.hub import is_repo_id
from ..run_dir import RunDir

LIBRARY = "transfusion-mot"
LICENSE = "apache-2.0"
TAGS = ["text-to-image", "image-to-text", "transfusion", "mixture-of-transformers", "diffusion", LIBRARY]


def run_facts(run: RunDir) -> dict[str, Any]:
    """What a run directory says about how its model was made (empty sections where a file is missing)."""
    facts: dict[str, Any] = {"summary": run.read_summary(), "evaluation": run.read_evaluation()}
    if run.exists():
        config = run.load_config().to_dict()
        facts["training"] = {"data": config["data"], "optim": config["optim"], "train": config["train"],
                             "tokenizer": config["tokenizer"]}
    return facts


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and abs(value) >= 10_000:
        return f"{value:,}"
    return "–" if value is None else str(value)


def _table(rows: list[tuple[str, Any]]) -> list[str]:
    return ["| | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in rows]


def card_body(model_config: Any, facts: dict[str, Any], info: dict[str, Any], latent_shape: tuple[int, ...],
              image_size: int, repo_id: str | None = None) -> str:
    """The card's Markdown (no metadata): what the model is, how it was trained and scored, how to load it."""
    m, s = model_config, facts.get("summary", {})
    params = s.get("parameters", {})
    untie = list(m.untie)
    kind = ("Mixture-of-Transformers (untied " + ", ".join(untie) + ")") if untie else "dense Transfusion"
    if m.image_tokens:
        kind = kind.replace("dense Transfusion", "dense")
        what = (f"A Chameleon-style text-to-image (and image-to-text) model on a {kind} backbone, trained with "
                f"[{LIBRARY}](https://pypi.org/project/{LIBRARY}/): one next-token loss on text and on the "
                f"{latent_shape[0]}x{latent_shape[1]} code grids of a {m.codebook_size}-code VQ tokenizer of "
                f"{image_size} px images, causal attention everywhere, one sequence.")
    else:
        what = (f"A Transfusion text-to-image (and image-to-text) model on a {kind} backbone, trained with "
                f"[{LIBRARY}](https://pypi.org/project/{LIBRARY}/): next-token loss on text and a {m.objective} "
                f"diffusion loss on {tuple(latent_shape)} VAE latents of {image_size} px images, one sequence.")
    lines = [f"# {repo_id.split('/')[-1] if repo_id else 'Transfusion MoT model'}", "", what, "", "## Model", ""]
    image_rows = ([("image objective", f"tokens (codebook {m.codebook_size})"),
                   ("image tokens", latent_shape[0] * latent_shape[1])] if m.image_tokens else
                  [("patch size", m.patch_size),
                   ("image tokens", (latent_shape[1] // m.patch_size) * (latent_shape[2] // m.patch_size)),
                   ("objective", m.objective)])
    started = ([("started from", f"{m.init_from} (its tokenizer; text experts, embeddings and LM head loaded, "
                 f"other experts {'copied from the text experts' if m.copy_experts else 'fresh'})"),
                ("frozen during training", ", ".join((facts.get("training") or {}).get("train", {}).get("freeze", []))
                 or "nothing")] if m.init_from else [])
    lines += _table([*started, ("width / layers / heads", f"{m.dim} / {m.n_layers} / {m.n_heads}"),
                     ("FFN width", m.ffn_dim), ("untied per modality", ", ".join(untie) or "nothing (dense)"),
                     ("vocabulary", m.vocab_size), ("context", m.max_seq_len), *image_rows,
                     ("parameters", params.get("total")),
                     ("shared parameters", params.get("shared")),
                     *((f"parameters: {k}", v) for k, v in params.get("per_modality", {}).items()),
                     *((f"active parameters per {k} token", v) for k, v in params.get("active_per_token", {}).items())])
    training = facts.get("training")
    if training or s:
        t = (training or {}).get("train", {})
        o = (training or {}).get("optim", {})
        d = (training or {}).get("data", {})
        data = d.get("builtin") or Path(str(d.get("path") or "")).name or None
        lines += ["", "## Training", ""]
        lines += _table([("data", data), ("data kind", d.get("kind")), ("steps", s.get("step")),
                         ("tokens seen", s.get("tokens_seen")), ("batch size (rows per process)", t.get("batch_size")),
                         ("processes", s.get("world_size")), ("learning rate", o.get("lr")),
                         ("precision", s.get("precision")), ("training time (s)", s.get("train_time_s")),
                         ("status", s.get("status"))])
    evaluation = facts.get("evaluation") or {}
    validation = s.get("validation", {})
    if evaluation or validation:
        lines += ["", "## Evaluation", ""]
        rows: list[tuple[str, Any]] = []
        last = validation.get("last") or {}
        for key in ("val_image_loss", "val_text_loss", "val_caption_loss"):
            if key in last:
                rows.append((f"held-out {key[4:].replace('_', ' ')} (step {last.get('step')})", last[key]))
        for key, value in evaluation.items():
            if isinstance(value, (int, float)):
                rows.append((key.replace("_", " "), value))
        lines += _table(rows)
        if isinstance(evaluation.get("sampling"), str):  # the images scored were not sampled with the defaults below
            lines += ["", f"The images these numbers score were sampled with {evaluation['sampling']}."]
    sampler = ("codes drawn one at a time in raster order (KV cache), temperature 1" if m.image_tokens else
               f"{'flow (FlowMatchEuler)' if m.objective == 'flow' else 'ddpm'} scheduler, 50 steps")
    lines += ["", "## Sampling", "",
              (f"Defaults: {sampler}, classifier-free guidance 3.0 (the empty caption is the unconditional model); "
               "one generator per image, so a seed gives the same image whatever it is batched with."), "",
              "## How to load it", "", "```python", "from transfusion_mot.inference.pipeline import Pipeline", "",
              f"pipe = Pipeline.from_pretrained(\"{repo_id or 'THIS_DIRECTORY'}\")",
              "images = pipe.generate([\"a large red circle\"], seed=0, cfg_scale=3.0"
              + (", temperature=1.0)" if m.image_tokens else ", num_steps=50)"),
              "captions = pipe.caption(images)", "```", "", "```bash",
              f"pip install {LIBRARY}",
              f"tmot sample --run {repo_id or 'THIS_DIRECTORY'} --prompt \"a large red circle\" --out samples/",
              f"tmot serve --run {repo_id or 'THIS_DIRECTORY'}     # a web page to prompt it", "```", ""]
    source = {k: v for k, v in info.items() if k in ("run", "checkpoint", "step", "weights")}
    if source:
        lines += ["Exported from " + ", ".join(f"{k} `{v}`" for k, v in source.items()) + ".", ""]
    return "\n".join(lines)


def model_card(model_config: Any, facts: dict[str, Any], info: dict[str, Any], latent_shape: tuple[int, ...],
               image_size: int, repo_id: str | None = None) -> str:
    """README.md: the Hub's YAML metadata (library, license, tags, pipeline tag) and `card_body`."""
    from huggingface_hub import ModelCard, ModelCardData

    base = {"base_model": model_config.init_from} if model_config.init_from and is_repo_id(model_config.init_from) else {}
    data = ModelCardData(library_name=LIBRARY, license=LICENSE, tags=TAGS, pipeline_tag="text-to-image", **base)
    body = card_body(model_config, facts, info, latent_shape, image_size, repo_id)
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


__all__ = ["LIBRARY", "card_body", "model_card", "run_facts"]
