"""`Pipeline`: a trained model with its tokenizer and VAE, for text -> image and image -> text.

    pipe = Pipeline.from_run("runs/shapes-tiny")            # EMA weights of the last checkpoint
    images = pipe.generate(["a small red circle above a large blue square"], seed=0, cfg_scale=3.0)
    captions = pipe.caption(images)
    pipe.save_pretrained("shapes-tiny-model")               # self-contained: no run directory needed
    pipe = Pipeline.from_pretrained("shapes-tiny-model")     # or a Hugging Face Hub id, ORG/NAME

A saved pipeline directory holds `pipeline.json` (format, provenance, what the model card states),
`README.md` (the model card), `model_config.yaml`, `model.safetensors`, `tokenizer/` (tokenizer.yaml and,
for BPE, tokenizer.json) and `vae/` (a diffusers `save_pretrained` AutoencoderKL, or for a model of image
tokens its VQModel).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from ..common.compile import compile_blocks
from ..common.config import from_dict, load_yaml_config, save_yaml_config
from ..common.device import resolve_device
from ..common.errors import InputNotFound, InvalidInput
from ..common.files import file_manifest, manifest_problem, write_json
from ..common.images import images_from_tensor
from ..config import TokenizerConfig, check_image_data
from ..model import TransfusionMoT
from ..run_dir import RunDir
from ..tokenizer import load_tokenizer
from .card import card_body, model_card, run_facts
from .hub import is_repo_id, resolve_pretrained
from .sampling import caption_images, generate_codes, generate_latents

PIPELINE_FORMAT = "tmot-pipeline/1"


class Pipeline:
    """Model + tokenizer + VAE. `generate` and `caption` are thin wrappers over `transfusion_mot.inference.sampling`."""

    def __init__(self, model: TransfusionMoT, tokenizer: Any, tokenizer_config: TokenizerConfig, vae: Any,
                 info: dict[str, Any] | None = None, facts: dict[str, Any] | None = None) -> None:
        self.model = model.eval()
        self.facts = dict(facts or {})  # how the model was made, for its card (`card.run_facts`)
        self.tokenizer = tokenizer
        self.tokenizer_config = tokenizer_config
        self.vae = vae.eval()
        self.info = dict(info or {})
        self.compiled = False  # the blocks compiled for sampling (`compile`)
        from vae import codebook_size, image_shape

        self.image_size = int(vae.config.sample_size)
        self.latent_shape = image_shape(vae, self.image_size)  # latents (C, h, w) or a VQ code grid (h, w)
        check_image_data(model.config, self.latent_shape, codebook_size(vae), "the pipeline's autoencoder")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def compile(self) -> Pipeline:
        """Compile the model's blocks (torch.compile, dynamic shapes) for a long text -> image job. The first
        prompt batch compiles two graphs (caption prefix, denoising step), and later batches of any prompts
        reuse them (a batch of a single prompt, and captioning, compile their own; past torch's limit of graphs
        per block, 8 by default, a new kind of call runs eagerly); the latents match eager sampling to float
        tolerance. On 2 CPU cores compiling costs 3-23 s once (inductor's cache warm or empty), and a batch
        then takes ~0.8x as long: worth it from a few hundred to a few thousand images (BENCHMARKS.md). A model
        of image tokens draws its codes through three graphs (prefix, first code, later codes); its speed is
        not measured. Compiling again does nothing; `common.compile.compile_counts` says what compile did."""
        if not self.compiled:
            compile_blocks(self.model)
            self.compiled = True
        return self

    # -- loading -----------------------------------------------------------------------------------

    @classmethod
    def from_run(cls, run_dir: str | Path, step: int | None = None, ema: bool = True, vae: str | None = None,
                 device: str | torch.device | None = None) -> Pipeline:
        """The run's checkpoint `step` (default: the last), EMA weights unless `ema=False`; the VAE the run
        trained on (from its config or latent cache) unless `vae` names another."""
        from vae import load_vae

        run = RunDir(run_dir)
        dev = resolve_device(device)
        model, config, loaded = run.load_model(step=step, ema=ema, device=dev)
        vae_path = vae or config.vae.path or loaded["vae"]
        if not vae_path:
            raise InputNotFound(f"{run_dir}: the run records no VAE; pass one (--vae DIR or hub id)")
        info = {"source": "run", "run": str(run.path.resolve()), **loaded, "vae": str(vae_path),
                "objective": config.model.objective}
        tokenizer = load_tokenizer(config.tokenizer, config.model)
        return cls(model, tokenizer, config.tokenizer, load_vae(vae_path, device=dev), info, run_facts(run))

    def model_card(self, repo_id: str | None = None, metadata: bool = True) -> str:
        """README.md of the exported directory: Hub metadata (unless `metadata=False`), the model, its
        training and evaluation."""
        render = model_card if metadata else card_body
        return render(self.model.config, self.facts, self.info, self.latent_shape, self.image_size, repo_id)

    def save_pretrained(self, out: str | Path, repo_id: str | None = None) -> Path:
        """A self-contained directory (written to a temporary name, then renamed): the model's own format
        (model_config.yaml, model.safetensors), tokenizer/, vae/ (diffusers), pipeline.json and the model
        card README.md (`repo_id`: the Hub id it will live under, for its loading instructions)."""
        out = Path(out)
        tmp = out.with_name(f".tmp-{out.name}")
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "tokenizer").mkdir(parents=True)
        self.model.save_pretrained(tmp)
        tok_cfg = TokenizerConfig(**vars(self.tokenizer_config))
        if tok_cfg.kind == "hf":
            shutil.copyfile(tok_cfg.path, tmp / "tokenizer" / "tokenizer.json")
            tok_cfg.path = "tokenizer.json"
        elif tok_cfg.kind == "pretrained":  # the language model's own tokenizer files
            self.tokenizer.save_pretrained(tmp / "tokenizer")
            tok_cfg.path = "."
        save_yaml_config(tok_cfg, tmp / "tokenizer" / "tokenizer.yaml")
        self.vae.save_pretrained(tmp / "vae", safe_serialization=True)
        (tmp / "README.md").write_text(self.model_card(repo_id))
        write_json(tmp / "pipeline.json", {"format": PIPELINE_FORMAT, "latent_shape": list(self.latent_shape),
                                           "image_size": self.image_size,
                                           "source": {k: v for k, v in self.info.items() if k != "source_dir"},
                                           "facts": self.facts,
                                           "files": file_manifest(tmp)})  # checked by from_pretrained
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        return out

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None,
                        revision: str | None = None) -> Pipeline:
        """A directory written by `save_pretrained` / `tmot export`, or a Hugging Face Hub id (ORG/NAME,
        downloaded once into the Hub cache; `revision`: a branch, tag or commit)."""
        from vae import load_vae

        path = resolve_pretrained(path, revision)
        meta_path = path / "pipeline.json"
        if not meta_path.is_file():
            raise InputNotFound(f"{path}: no pipeline.json (write one with Pipeline.save_pretrained or "
                                "`tmot export`; for a run directory use Pipeline.from_run)")
        try:
            meta = json.loads(meta_path.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise InvalidInput(f"{meta_path}: damaged pipeline.json ({err})") from None
        if not isinstance(meta, dict) or meta.get("format") != PIPELINE_FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise InvalidInput(f"{path}: unknown pipeline format {found!r} (expected {PIPELINE_FORMAT})")
        problem = manifest_problem(path, meta["files"]) if isinstance(meta.get("files"), dict) else None
        if problem:
            raise InvalidInput(f"damaged pipeline {path}: {problem}; export it again (tmot export)")
        dev = resolve_device(device)
        model = TransfusionMoT.from_pretrained(path, device=dev)
        tok_cfg = load_yaml_config(TokenizerConfig, path / "tokenizer" / "tokenizer.yaml")
        if tok_cfg.kind in ("hf", "pretrained"):
            tok_cfg = from_dict(TokenizerConfig, {**vars(tok_cfg), "path": str(path / "tokenizer" / tok_cfg.path)})
        info = {**meta.get("source", {}), "source": "pretrained", "source_dir": str(path.resolve())}
        return cls(model, load_tokenizer(tok_cfg, model.config), tok_cfg, load_vae(path / "vae", device=dev), info,
                   meta.get("facts", {}))

    # -- text -> image -----------------------------------------------------------------------------

    @torch.no_grad()
    def generate_latents(self, prompts: Sequence[str], **kwargs: Any) -> Tensor:
        """Latents (N, C, h, w) by diffusion, or (image tokens) code grids (N, h, w) drawn one code at a time;
        `kwargs` go to `sampling.generate_latents` or `sampling.generate_codes`."""
        if self.model.config.image_tokens:
            return generate_codes(self.model, self.tokenizer, list(prompts), grid=self.latent_shape,
                                  device=self.device, **kwargs)
        return generate_latents(self.model, self.tokenizer, list(prompts), latent_shape=self.latent_shape,
                                device=self.device, **kwargs)

    @torch.no_grad()
    def decode(self, latents: Tensor, batch_size: int = 64) -> list[Image.Image]:
        from vae import decode

        images: list[Image.Image] = []
        for i in range(0, len(latents), batch_size):
            images += images_from_tensor(decode(self.vae, latents[i:i + batch_size].to(self.device)))
        return images

    def generate(self, prompts: Sequence[str], *, seed: int | Sequence[int] = 0, cfg_scale: float = 3.0,
                 guidance_rescale: float = 0.0, num_steps: int = 50, scheduler: str | None = None,
                 use_kv_cache: bool = True, batch_size: int = 16, dtype: torch.dtype | None = None,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None) -> list[Image.Image]:
        """One image per prompt. seed: an int (prompt i uses seed + i) or one seed per prompt. num_steps,
        scheduler and guidance_rescale (in [0, 1]: `sampling.rescale_guidance`) are the diffusion sampler's;
        temperature, top_k and top_p pick the codes of a model of image tokens."""
        kwargs: dict[str, Any] = dict(seed=seed, cfg_scale=cfg_scale, use_kv_cache=use_kv_cache, batch_size=batch_size,
                                      dtype=dtype)
        if self.model.config.image_tokens:
            if scheduler is not None or guidance_rescale:
                what = f"scheduler {scheduler!r}" if scheduler is not None else f"guidance_rescale {guidance_rescale}"
                raise InvalidInput(f"{what}: this model draws image codes one at a time (image_objective tokens); it "
                                   "has no diffusion scheduler, steps or guidance rescale")
            kwargs.update(temperature=temperature, top_k=top_k, top_p=top_p)
        else:
            kwargs.update(num_steps=num_steps, scheduler=scheduler, guidance_rescale=guidance_rescale)
        return self.decode(self.generate_latents(prompts, **kwargs))

    def sample_to_folder(self, prompts: Sequence[str], out: str | Path, *, n: int = 1, seed: int = 0,
                         cfg_scale: float = 3.0, guidance_rescale: float = 0.0, num_steps: int = 50,
                         scheduler: str | None = None, use_kv_cache: bool = True, batch_size: int = 16,
                         temperature: float = 1.0, top_k: int | None = None,
                         top_p: float | None = None) -> list[dict[str, Any]]:
        """`n` images per prompt into `out` (00000.png..., grid.png with one row per prompt when n > 1, and
        manifest.json: prompt and seed of every image, and how they were sampled); image k uses seed + k.
        Returns the manifest's rows."""
        from ..common.images import image_grid
        from ..data.imageio import save_images
        from .sampling import scheduler_name

        if not prompts:
            raise InvalidInput("give a prompt to sample from")
        expanded = [p for p in prompts for _ in range(n)]
        seeds = [seed + k for k in range(len(expanded))]
        images = self.generate(expanded, seed=seeds, cfg_scale=cfg_scale, guidance_rescale=guidance_rescale,
                               num_steps=num_steps, scheduler=scheduler, use_kv_cache=use_kv_cache,
                               batch_size=batch_size, temperature=temperature, top_k=top_k, top_p=top_p)
        out = Path(out)
        how = ({"sampler": "autoregressive codes", "temperature": temperature, "top_k": top_k, "top_p": top_p}
               if self.model.config.image_tokens else
               {"steps": num_steps, "scheduler": scheduler_name(self.model.config, scheduler),
                "guidance_rescale": guidance_rescale})
        rows = save_images(images, out, [{"prompt": p, "seed": s} for p, s in zip(expanded, seeds)], manifest={
            "source": self.info.get("run") or self.info.get("source_dir"), "checkpoint": self.info.get("checkpoint"),
            "step": self.info.get("step"), "weights": self.info.get("weights"), "cfg": cfg_scale, **how,
            "kv_cache": use_kv_cache, "compiled": self.compiled, "image_size": self.image_size})
        image_grid(images, cols=n if n > 1 else None).save(out / "grid.png")
        return rows

    # -- image -> text -----------------------------------------------------------------------------

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image | str | Path]) -> Tensor:
        """Images (PIL or paths; any size, centre-cropped and resized to the VAE's) -> latents (or VQ codes)."""
        from vae import encode

        z = encode(self.vae, image_batch(images, self.image_size).to(self.device))
        return z.float() if z.is_floating_point() else z

    def caption(self, images: Sequence[Image.Image | str | Path], *, max_new_tokens: int = 64,
                temperature: float = 0.0, top_k: int | None = None, seed: int | Sequence[int] = 0,
                use_kv_cache: bool = True) -> list[str]:
        latents = self.encode_images(images)
        return caption_images(self.model, self.tokenizer, latents, max_new_tokens=max_new_tokens,
                              temperature=temperature, top_k=top_k, seed=seed, use_kv_cache=use_kv_cache,
                              device=self.device)


def image_batch(images: Sequence[Image.Image | str | Path], size: int) -> Tensor:
    """Images (PIL or paths) centre-cropped and resized to `size` px, as one (N, 3, size, size) batch in [-1, 1];
    a missing or unreadable file is a one-line error."""
    from ..data.imageio import BadImage, center_crop_resize, load_rgb
    from ..data.readers import to_tensor

    tensors = []
    for im in images:
        if not isinstance(im, Image.Image):
            if not Path(im).is_file():
                raise InputNotFound(f"image not found: {im}")
            try:
                im = load_rgb(im)
            except BadImage as err:
                raise InvalidInput(f"{im}: cannot read image ({err})") from None
        tensors.append(to_tensor(center_crop_resize(im.convert("RGB"), size)))
    if not tensors:
        raise InvalidInput("no images to caption")
    return torch.stack(tensors)


def load_pipeline(source: str | Path, *, step: int | None = None, ema: bool = True,
                  device: str | torch.device | None = None, compiled: bool = False) -> Pipeline:
    """A run directory (config.yaml + checkpoints/), a saved pipeline directory (pipeline.json) or the Hub
    id of one; with `compiled`, its blocks compiled (`Pipeline.compile`)."""
    if is_repo_id(source) or (Path(source) / "pipeline.json").is_file():
        pipe = Pipeline.from_pretrained(source, device=device)
    elif RunDir(source).exists():
        pipe = Pipeline.from_run(source, step=step, ema=ema, device=device)
    elif not Path(source).exists():
        raise InputNotFound(f"{source}: not found (expected a run directory or a saved pipeline)")
    else:
        raise InputNotFound(f"{source}: neither a run directory (config.yaml) nor a saved pipeline (pipeline.json)")
    return pipe.compile() if compiled else pipe
