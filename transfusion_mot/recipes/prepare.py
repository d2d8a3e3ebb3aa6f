"""What a run needs before its trainer is built (`prepare_run`), made from its data: the embedded default
data end to end (images -> tiny VAE -> latent caches of the train and val splits), reusing whatever a
previous call already finished (`tmot train` builds it when a config names `data.builtin`, and `tmot demo`
builds the same artifacts, so the first command a user runs can train without any download); for a config
whose tokenizer is `hf` with no file, a BPE trained on the training captions of whatever data it trains on;
the checks against a language model the run starts from; and the run directory, begun or resumed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..common.config import shipped_config_names, shipped_configs_dir
from ..common.distributed import DistInfo, barrier
from ..common.errors import ConfigError
from ..config import DataConfig, RunConfig
from ..pretrained import check_matches_lm, check_tokenizer_matches_lm, save_lm_files
from ..run_dir import RunDir
from ..tokenizer import Tokenizer, load_tokenizer
from ..training.stream import resolve_data_kind

BUILTINS = ("shapes", "emoji")


@dataclass
class PreparedData:
    data_dir: Path  # image folder (train and val splits in metadata.jsonl)
    vae_dir: Path  # trained tiny AutoencoderKL (save_pretrained layout)
    latents_dir: Path  # latent cache of the train split
    val_latents_dir: Path  # latent cache of the val split (held-out losses)
    info: dict[str, Any]
    tokenizer: Path | None = None  # BPE tokenizer.json trained on the train captions (when asked for)


def vae_config_for(image_size: int) -> Path:
    """The shipped tiny VAE config for built-in data of `image_size` px (configs/vae/tiny-SIZE.yaml)."""
    path = shipped_configs_dir() / "vae" / f"tiny-{image_size}.yaml"
    if not path.is_file():
        sizes = [n.removeprefix("tiny-") for n in shipped_config_names("vae") if n.startswith("tiny-")]
        raise ConfigError(f"no built-in VAE for {image_size} px images (data.builtin_image_size); shipped sizes: "
                          f"{', '.join(sizes)}; or train a VAE with `tmot vae train` and pass --data/--vae")
    return path


def prepare_builtin(name: str, root: str | Path, image_size: int = 32, num_images: int = 20000,
                    vae_steps: int = 1500, seed: int = 0, workers: int = 2, progress: bool = True,
                    tokenizer_vocab: int | None = None, log=print) -> PreparedData:
    """Images, VAE and train/val latents of a built-in data set under `root`, and with `tokenizer_vocab` a
    byte-level BPE of up to that many ids (specials included) trained on the train captions; each stage is
    skipped when its output is already complete (stages write their completion marker last)."""
    from vae import LatentDataset, encode_folder, train_vae

    from ..common.errors import InputNotFound

    if name not in BUILTINS:
        raise ConfigError(f"unknown built-in data set {name!r}; choose one of {list(BUILTINS)}")
    root = Path(root)
    data_dir, vae_dir, latents_dir, val_dir = root / "data", root / "vae", root / "latents", root / "latents-val"
    info: dict[str, Any] = {"name": name, "image_size": image_size, "reused": []}

    if (data_dir / "metadata.jsonl").is_file():
        info["reused"].append("data")
    else:
        log(f"[prepare] generating {name} images ({image_size} px) in {data_dir}")
        if name == "shapes":
            from ..data.shapes import generate_shapes

            generate_shapes(data_dir, num=num_images, size=image_size, seed=seed, val_fraction=0.05,
                            workers=workers)
        else:
            from ..data.emoji import generate_emoji

            generate_emoji(data_dir, size=image_size, seed=seed)

    if (vae_dir / "config.json").is_file() and any(vae_dir.glob("*.safetensors")):
        info["reused"].append("vae")
    else:
        log(f"[prepare] training the tiny VAE for {vae_steps} steps in {vae_dir}")
        summary = train_vae(vae_config_for(image_size), data_dir, vae_dir, max_steps=vae_steps, progress=progress)
        info["vae_train"] = {k: summary[k] for k in ("steps", "train_time_s", "final") if k in summary}

    for split, cache in (("train", latents_dir), ("val", val_dir)):
        try:
            count = len(LatentDataset(cache))
            info["reused"].append("latents" if split == "train" else "latents-val")
        except InputNotFound:  # not encoded yet, or cut short before its index was written
            log(f"[prepare] encoding the {split} split into {cache}")
            count = encode_folder(vae_dir, data_dir, cache, split=split, progress=progress)["count"]
        info["latents" if split == "train" else "val_latents"] = count
    tokenizer = None
    if tokenizer_vocab is not None:
        tokenizer = root / f"tokenizer-{tokenizer_vocab}.json"
        if tokenizer.is_file():
            info["reused"].append("tokenizer")
        else:  # written to a temporary name first: a tokenizer file that exists is complete
            from ..tokenizer import train_tokenizer_from_folder

            partial = tokenizer.with_name(f".tmp-{tokenizer.name}")
            train_tokenizer_from_folder(data_dir, tokenizer_vocab, partial)  # up to that many ids
            partial.replace(tokenizer)
    return PreparedData(data_dir, vae_dir, latents_dir, val_dir, info, tokenizer)


def builtin_tokenizer_vocab(config: RunConfig) -> int | None:
    """A run config asks for a BPE trained on the built-in captions when its tokenizer is `hf` with no file:
    then of `model.vocab_size` ids. None: the config brings its own tokenizer (or uses bytes)."""
    tok = config.tokenizer
    return config.model.vocab_size if tok.kind == "hf" and not tok.path else None


def prepare_for_run(config: RunConfig, root: str | Path | None = None, build: bool = True, progress: bool = True,
                    log=print) -> PreparedData:
    """Build the built-in data set a run config names (`data.builtin`, with its size, VAE steps and seed)
    and point the config at it: data.path (train latents), data.val_path, vae.path and, for a BPE, the
    tokenizer. `root` defaults to data.builtin_dir/NAME-SIZE. With build=False only the paths are set (the
    other ranks of a multi-process run, after the main one built them)."""
    d = config.data
    if not d.builtin:
        raise ConfigError("data.builtin is not set: there is no built-in data set to prepare")
    root = Path(root) if root is not None else Path(d.builtin_dir) / f"{d.builtin}-{d.builtin_image_size}"
    vocab = builtin_tokenizer_vocab(config)
    if build:
        prepared = prepare_builtin(d.builtin, root, image_size=d.builtin_image_size, num_images=d.builtin_num_images,
                                   vae_steps=d.builtin_vae_steps, seed=config.train.seed, progress=progress,
                                   tokenizer_vocab=vocab, log=log)
    else:
        prepared = PreparedData(root / "data", root / "vae", root / "latents", root / "latents-val", {},
                                root / f"tokenizer-{vocab}.json" if vocab is not None else None)
    d.kind, d.path = "latents", str(prepared.latents_dir)
    d.val_path = d.val_path or str(prepared.val_latents_dir)
    config.vae.path = config.vae.path or str(prepared.vae_dir)
    if prepared.tokenizer is not None:
        config.tokenizer.path = str(prepared.tokenizer)
    return prepared


# WebDataset shards are read for captions only (no image is decoded), but a corpus of millions of captions
# needs no more than this many for a BPE of a few thousand ids
MAX_TOKENIZER_CAPTIONS = 200_000


def training_captions(data: DataConfig) -> Iterator[str]:
    """The training captions of a data config, in order: a latent cache's sidecars, an image folder's rows
    of the training split, or the first MAX_TOKENIZER_CAPTIONS captions of WebDataset shards."""
    if data.kind == "latents":
        from vae.latents import LatentDataset

        return LatentDataset(data.path).captions()
    if data.kind == "folder":
        from ..tokenizer import folder_captions

        return folder_captions(data.path, data.split)
    from ..data.readers import webdataset_captions

    return webdataset_captions(data.path, limit=MAX_TOKENIZER_CAPTIONS)


def train_data_tokenizer(config: RunConfig, out: str | Path) -> Any:
    """A byte-level BPE of up to `model.vocab_size` ids (specials included) trained on the run's training
    captions, saved at `out`; fewer ids when the captions run out of pairs to merge (the caller then sizes
    the model to the tokenizer)."""
    from ..tokenizer import HFTokenizer, train_tokenizer

    out = Path(out)
    partial = out.with_name(f".tmp-{out.name}")  # a tokenizer file that exists is complete
    train_tokenizer(training_captions(config.data), config.model.vocab_size, partial,
                    source=f"{config.data.path} (tokenizer.kind 'hf' with no path: give tokenizer.path, or kind bytes)")
    partial.replace(out)
    return HFTokenizer(out)


# --------------------------------------------------------------------------------------------------
# a run, prepared


def prepare_run(config: RunConfig, run: RunDir, resume: bool, dist: DistInfo) -> tuple[Tokenizer, Path | None]:
    """(the run's tokenizer, the checkpoint to resume from) once everything a run needs before its trainer is
    built is in place, in this order: the built-in data set (the main process builds it, the others wait);
    absolute paths and the data's kind; the checks against a language model the run starts from; the tokenizer
    (a BPE of the training captions, trained once by the main process, when the config asks for one) with the
    model sized to it; then the run directory: config.yaml written (a new run) or checked (--resume), and the
    language model's config and tokenizer kept in it, so the run needs no Hub afterwards."""
    if not resume and run.latest_checkpoint() is not None:
        raise ConfigError(f"{run.path} already holds checkpoints: pass --resume to continue it, or choose a new --out")
    trains_tokenizer = config.tokenizer.kind == "hf" and not config.tokenizer.path
    if config.data.path is None and config.data.builtin:
        if dist.is_main:
            prepare_for_run(config, progress=config.train.progress)
        barrier(dist)
        prepare_for_run(config, build=False)  # every process: the paths of what the main one built
    config.make_paths_absolute()  # the run directory then works from any directory
    resolve_data_kind(config.data)
    lm = config.model.init_from
    if lm:
        check_matches_lm(config.model)
        if resume and (run.lm_dir / "config.json").is_file():  # a resumed run has its own copy of the LM's files
            config.tokenizer.path = str(run.lm_dir.resolve())
    if config.tokenizer.kind == "hf" and not config.tokenizer.path:  # built-in data brings its BPE; other data not
        config.tokenizer.path = str(run_tokenizer(config, run, dist))
    tokenizer = load_tokenizer(config.tokenizer, config.model)
    fit_vocab_size(config, tokenizer, trained=trains_tokenizer, report=dist.is_main)
    if lm:
        check_tokenizer_matches_lm(tokenizer, lm)
        config.tokenizer.path = str(run.lm_dir.resolve())  # written below
    resume_from = run.begin(config, resume, dist)
    if lm and dist.is_main and resume_from is None:
        save_lm_files(lm, tokenizer, run.lm_dir)
    barrier(dist)
    return tokenizer, resume_from


def run_tokenizer(config: RunConfig, run: RunDir, dist: DistInfo) -> Path:
    """RUN/tokenizer.json: a BPE of up to model.vocab_size ids trained on the training captions, by the main
    process, once (a resumed run keeps its own)."""
    path = run.tokenizer_file.resolve()
    if dist.is_main and not path.is_file():
        print(f"[tokenizer] training a BPE of up to {config.model.vocab_size} ids on the training captions of "
              f"{config.data.path} -> {path}", file=sys.stderr)
        run.path.mkdir(parents=True, exist_ok=True)
        train_data_tokenizer(config, path)
    barrier(dist)
    return path


def fit_vocab_size(config: RunConfig, tokenizer: Tokenizer, trained: bool, report: bool) -> None:
    """model.vocab_size = the tokenizer's where the run trained its BPE and the captions gave fewer merges than
    asked for; any other mismatch is a ConfigError saying what to set."""
    if trained and tokenizer.vocab_size < config.model.vocab_size:  # few captions: fewer merges
        if report:
            print(f"note: the training captions give a BPE of {tokenizer.vocab_size} ids, not model.vocab_size "
                  f"{config.model.vocab_size}: the model is sized to it", file=sys.stderr)
        config.model.vocab_size = tokenizer.vocab_size
    if tokenizer.vocab_size != config.model.vocab_size:
        raise ConfigError(f"model.vocab_size is {config.model.vocab_size} but the tokenizer has {tokenizer.vocab_size} "
                          f"ids (specials included): set model.vocab_size={tokenizer.vocab_size}")
