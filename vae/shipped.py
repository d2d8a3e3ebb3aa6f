"""Pretrained tiny autoencoders shipped inside the package, for the built-in data sets.

Training the tiny VAE is the most expensive step before the MoT's own training on a 2-core CPU (its convolutions
run at the cores' peak), and it is not what this project is about: Transfusion itself starts from a pretrained
VAE. So the built-in shapes data at 32 px comes with one, trained once with the repository's own commands (the
model card in its directory says which) and copied next to the latent caches it encodes. `data.builtin_vae:
train` trains one instead."""

from __future__ import annotations

import filecmp
import os
import shutil
import tempfile
from pathlib import Path

from transfusion_mot.common.errors import ConfigError

PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
# (built-in data set, image size) -> directory under PRETRAINED_DIR (diffusers save_pretrained layout)
SHIPPED_VAES = {("shapes", 32): "shapes-32"}


def shipped_vae_dir(name: str, image_size: int) -> Path:
    """The directory of the shipped VAE for built-in data `name` at `image_size` px; a ConfigError where none is
    shipped (emoji, other sizes, VQ tokenizers: those are trained, `data.builtin_vae: train`)."""
    key = SHIPPED_VAES.get((name, image_size))
    if key is None:
        shipped = ", ".join(f"{n} at {s} px" for n, s in SHIPPED_VAES)
        raise ConfigError(f"no shipped VAE for the built-in {name} data at {image_size} px (shipped: {shipped}); set "
                          "data.builtin_vae: train to train one")
    path = PRETRAINED_DIR / key
    if not (path / "config.json").is_file():  # a broken install, not a user mistake
        raise FileNotFoundError(f"the shipped VAE is missing from this installation: {path}")
    return path


def copy_shipped_vae(name: str, image_size: int, vae_dir: str | Path) -> Path:
    """Copy the shipped VAE of (name, image_size) to `vae_dir` (replaced; written beside it, then renamed, so a
    stopped copy never leaves a half VAE that would be reused)."""
    source, vae_dir = shipped_vae_dir(name, image_size), Path(vae_dir)
    vae_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{vae_dir.name}-", dir=vae_dir.parent))
    for file in source.iterdir():  # weights, config, training config and model card
        if file.is_file():
            shutil.copy2(file, staging / file.name)
    shutil.rmtree(vae_dir, ignore_errors=True)
    os.replace(staging, vae_dir)
    return vae_dir


def is_shipped_copy(name: str, image_size: int, vae_dir: str | Path) -> bool:
    """Whether `vae_dir` holds the weights shipped for (name, image_size), byte for byte: a folder prepared by an
    older release (another shipped VAE) or by `data.builtin_vae: train` does not."""
    vae_dir = Path(vae_dir)
    return all((vae_dir / f.name).is_file() and filecmp.cmp(f, vae_dir / f.name, shallow=False)
               for f in shipped_vae_dir(name, image_size).glob("*.safetensors"))


__all__ = ["PRETRAINED_DIR", "SHIPPED_VAES", "copy_shipped_vae", "is_shipped_copy", "shipped_vae_dir"]
