"""What a run needs before its trainer is built (`prepare_run`), made from its data: the embedded default
data end to end (images -> tiny VAE, trained or shipped -> latent caches of the train and val splits; for a model
of image tokens, images -> tiny VQ tokenizer -> caches of code grids, beside them), reusing whatever a
previous call already finished (`tmot train` builds it when a config names `data.builtin`, and `tmot demo`
builds the same artifacts, so the first command a user runs can train without any download); for a config
whose tokenizer is `hf` with no file, a BPE trained on the training captions of whatever data it trains on;
the checks against a language model the run starts from; and the run directory, begun or resumed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..common.config import shipped_config_names, shipped_configs_dir
from ..common.device import resolve_device, resolve_precision
from ..common.distributed import DistInfo, barrier, init_distributed
from ..common.errors import ConfigError
from ..config import BUILTIN_VAES, RunConfig
from ..data.sources import open_source
from ..pretrained import check_matches_lm, keep_lm_files
from ..run_dir import RunDir
from ..tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from ..training.trainer import PreparedRun

BUILTINS = ("shapes", "emoji")


@dataclass
class PreparedData:
    """Where a built-in data set lives under its root, and (once built) what was built or reused."""

    data_dir: Path  # image folder (train and val splits in metadata.jsonl)
    vae_dir: Path  # trained tiny AutoencoderKL, or VQModel (save_pretrained layout)
    latents_dir: Path  # latent (or code) cache of the train split
    val_latents_dir: Path  # latent (or code) cache of the val split (held-out losses)
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def under(cls, root: str | Path, codes: bool = False) -> PreparedData:
        """The layout under `root`; `codes`: the VQ tokenizer and its code caches (one image folder for both)."""
        root = Path(root)
        if codes:
            return cls(root / "data", root / "vq", root / "codes", root / "codes-val")
        return cls(root / "data", root / "vae", root / "latents", root / "latents-val")


def vae_config_for(image_size: int, codes: bool = False) -> Path:
    """The shipped tiny autoencoder config for built-in data of `image_size` px: configs/vae/tiny-SIZE.yaml, or
    with `codes` the VQ tokenizer's configs/vae/vq-tiny-SIZE.yaml."""
    prefix = "vq-tiny-" if codes else "tiny-"
    path = shipped_configs_dir() / "vae" / f"{prefix}{image_size}.yaml"
    if not path.is_file():
        sizes = [n.removeprefix(prefix) for n in shipped_config_names("vae") if n.startswith(prefix)]
        what = "VQ tokenizer" if codes else "VAE"
        raise ConfigError(f"no built-in {what} for {image_size} px images (data.builtin_image_size); shipped sizes: "
                          f"{', '.join(sizes)}; or train one with `tmot vae train` and pass --data/--vae")
    return path


def prepare_builtin(name: str, root: str | Path, image_size: int = 32, num_images: int = 20000,
                    vae_steps: int = 1500, seed: int = 0, workers: int = 2, progress: bool = True,
                    log=print, codes: bool = False, vae: str = "train") -> PreparedData:
    """Images, VAE and train/val latents of a built-in data set under `root` (with `codes`: a VQ tokenizer and
    train/val code caches); each stage is skipped when its output is already complete (stages write their
    completion marker last). `vae` "train" trains the VAE for `vae_steps`, "shipped" copies the pretrained one
    of the package (`vae.shipped`). A run's BPE of the captions is trained from the cache like any other data's
    (`prepare_run`)."""
    from vae import encode_folder, train_vae
    from vae.shipped import copy_shipped_vae, is_shipped_copy, shipped_vae_dir

    from ..data.latents import LatentDataset, is_latent_cache

    if name not in BUILTINS:
        raise ConfigError(f"unknown built-in data set {name!r}; choose one of {list(BUILTINS)}")
    if vae == "shipped":
        if codes:
            raise ConfigError("no shipped VQ tokenizer: a model of image tokens needs data.builtin_vae: train")
        shipped_vae_dir(name, image_size)  # before any work: there is one for this data and size
    elif vae not in BUILTIN_VAES:
        raise ConfigError(f"data.builtin_vae must be one of {list(BUILTIN_VAES)}, got {vae!r}")
    vae_config = vae_config_for(image_size, codes)
    prepared = PreparedData.under(root, codes)
    what = "VQ tokenizer" if codes else "VAE"
    info = prepared.info = {"name": name, "image_size": image_size, "reused": []}
    data_dir, vae_dir = prepared.data_dir, prepared.vae_dir
    caches = {prepared.latents_dir.name: (prepared.latents_dir, "train"),
              prepared.val_latents_dir.name: (prepared.val_latents_dir, "val")}
    missing = {key: not is_latent_cache(cache) for key, (cache, _) in caches.items()}
    info["reused"] = [key for key, done in (("data", (data_dir / "metadata.jsonl").is_file()),
                                            ("vae", (vae_dir / "config.json").is_file()
                                             and any(vae_dir.glob("*.safetensors")))) if done]
    info["reused"] += [key for key, absent in missing.items() if not absent]
    if "data" not in info["reused"]:
        log(f"[prepare] generating {name} images ({image_size} px) in {data_dir}")
        if name == "shapes":
            from ..data.shapes import generate_shapes

            generate_shapes(data_dir, num=num_images, size=image_size, seed=seed, val_fraction=0.05,
                            workers=workers)
        else:
            from ..data.emoji import generate_emoji

            generate_emoji(data_dir, size=image_size, seed=seed)
    if "vae" in info["reused"] and vae == "shipped" and not is_shipped_copy(name, image_size, vae_dir):
        info["vae_not_shipped"] = True  # reused all the same: nothing built is thrown away unasked
        log(f"[prepare] note: {vae_dir} is not the VAE shipped with this package (trained here, or an older "
            f"release's); reusing it and its latents. Delete {Path(root)} to rebuild with the shipped one")
    if "vae" not in info["reused"] and vae == "shipped":
        log(f"[prepare] copying the shipped tiny VAE of the {name} data to {vae_dir}")
        copy_shipped_vae(name, image_size, vae_dir)
        info["vae_shipped"] = True
    elif "vae" not in info["reused"]:
        log(f"[prepare] training the tiny {what} for {vae_steps} steps in {vae_dir}")
        summary = train_vae(vae_config, data_dir, vae_dir, max_steps=vae_steps, progress=progress)
        info["vae_train"] = {k: summary[k] for k in ("steps", "train_time_s", "final") if k in summary}
    for key, (cache, split) in caches.items():
        if missing[key]:  # not encoded yet, or cut short before its index was written
            log(f"[prepare] encoding the {split} split into {cache}")
            encode_folder(vae_dir, data_dir, cache, split=split, progress=progress)
    info["latents"], info["val_latents"] = (len(LatentDataset(cache)) for cache, _ in caches.values())
    return prepared


def prepare_for_run(config: RunConfig, root: str | Path | None = None, build: bool = True, progress: bool = True,
                    log=print) -> PreparedData:
    """Point a run config at the built-in data set it names (`data.builtin`: data.path = the train latents,
    data.val_path, vae.path) and, with `build`, build it (with its size, VAE steps and seed; reused when
    complete). `root` defaults to data.builtin_dir/NAME-SIZE."""
    d, codes = config.data, config.model.image_tokens
    if not d.builtin:
        raise ConfigError("data.builtin is not set: there is no built-in data set to prepare")
    root = Path(root) if root is not None else Path(d.builtin_dir) / f"{d.builtin}-{d.builtin_image_size}"
    prepared = PreparedData.under(Path(root).resolve(), codes)  # absolute: the run's config works from anywhere
    d.kind, d.path = "latents", str(prepared.latents_dir)
    d.val_path = d.val_path or str(prepared.val_latents_dir)
    config.vae.path = config.vae.path or str(prepared.vae_dir)
    if build:
        prepared = prepare_builtin(d.builtin, root, image_size=d.builtin_image_size, num_images=d.builtin_num_images,
                                   vae_steps=d.builtin_vae_steps, seed=config.train.seed, progress=progress, log=log,
                                   codes=codes, vae=d.builtin_vae)
    return prepared


# --------------------------------------------------------------------------------------------------
# a run, prepared


def prepare_run(config: RunConfig, run: RunDir, resume: bool) -> PreparedRun:
    """Everything a run needs before its trainer is built, in this order: the checks against a language model
    the run starts from; the process group (torchrun) and this process's device; the built-in data set (the
    main process builds it, the others wait); the tokenizer (a BPE of the training captions, trained once by
    the main process, when the config asks for one) with the model sized to it, or the language model's,
    kept in the run directory so the run needs no Hub afterwards; then the run directory: its config written
    (a new run) or checked (--resume)."""
    if not resume and run.latest_checkpoint() is not None:
        raise ConfigError(f"{run.path} already holds checkpoints: pass --resume to continue it, or choose a new --out")
    tc, lm = config.train, config.model.init_from
    if lm:
        check_matches_lm(config.model)
    dist = init_distributed(tc.device)
    device = resolve_device(tc.device, dist.local_rank)
    precision = resolve_precision(tc.precision, device)
    if config.data.path is None and config.data.builtin:  # built by the main process; the others wait
        prepare_for_run(config, build=dist.is_main, progress=tc.progress)
        barrier(dist)
    tokenizer = run_tokenizer(config, run, resume, dist)
    resume_from = run.begin(config, resume, dist)
    return PreparedRun(run, dist, device, precision, tokenizer, resume_from)


def run_tokenizer(config: RunConfig, run: RunDir, resume: bool, dist: DistInfo) -> Tokenizer:
    """The run's tokenizer. Kind hf with no file: RUN/tokenizer.json, a BPE of up to model.vocab_size ids trained
    on the training captions by the main process, once (a resumed run keeps its own), and the model sized to
    it when the captions give fewer merges. Kind pretrained: the language model's, checked against its config,
    from the run's own copy once it has one. Any other mismatch with model.vocab_size is a ConfigError."""
    tok = config.tokenizer
    trains = tok.kind == "hf" and not tok.path
    lm_copy = run.lm_dir.resolve()
    if trains:
        tok.path = str(run.tokenizer_file.resolve())
        if dist.is_main and not run.tokenizer_file.is_file():
            print(f"[tokenizer] training a BPE of up to {config.model.vocab_size} ids on the training captions of "
                  f"{config.data.path} -> {tok.path}", file=sys.stderr)
            train_tokenizer(open_source(config.data).captions(), config.model.vocab_size, tok.path,
                            source=f"{config.data.path} (tokenizer.kind 'hf' with no path: give tokenizer.path, or kind "
                            "bytes)")
        barrier(dist)
    elif resume and (lm_copy / "config.json").is_file():
        tok.path = str(lm_copy)
    tokenizer = load_tokenizer(tok, config.model)
    if trains and tokenizer.vocab_size < config.model.vocab_size:  # few captions: fewer merges
        if dist.is_main:
            print(f"note: the training captions give a BPE of {tokenizer.vocab_size} ids, not model.vocab_size "
                  f"{config.model.vocab_size}: the model is sized to it", file=sys.stderr)
        config.model.vocab_size = tokenizer.vocab_size
    if tokenizer.vocab_size != config.model.vocab_size:
        raise ConfigError(f"model.vocab_size is {config.model.vocab_size} but the tokenizer has {tokenizer.vocab_size} "
                          f"ids (specials included): set model.vocab_size={tokenizer.vocab_size}")
    if config.model.init_from:  # the language model's tokenizer and config, checked, kept in the run directory
        keep_lm_files(config.model.init_from, tokenizer, lm_copy, write=dist.is_main and not resume)
        tok.path = str(lm_copy)
    return tokenizer
