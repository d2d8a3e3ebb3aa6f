"""The image autoencoder: a diffusers `AutoencoderKL` plus the latent normalisation the diffusion model sees, or
a diffusers `VQModel` whose codebook indices are an image's discrete tokens (the Chameleon setting).

The diffusion backbone wants latents of roughly unit variance and zero mean, so every latent that leaves
this module is `(z - shift_factor) * scaling_factor` (Stable Diffusion 3 / Flux convention; SD 1.x is the
special case shift 0, scale 0.18215). Both numbers live in the AutoencoderKL's own config, so
`save_pretrained`/`from_pretrained` carry them and a cache can never be decoded with the wrong ones.

A VQModel's output is instead an int64 grid of codes (B, h, w), each the nearest codebook vector to the
encoder's output at that position; codes need no normalisation (scale 1, shift 0). `encode`/`decode` take
either kind of autoencoder, so code that only holds "the autoencoder" works for both.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from transfusion_mot.common.config import load_yaml_config, require_ranges
from transfusion_mot.common.errors import ConfigError, InputNotFound, InvalidInput

KINDS = ("kl", "vq")
RECON_LOSSES = ("l1", "mse", "l1+mse")
LR_SCHEDULES = ("constant", "cosine")
HUB_EXAMPLE = "stabilityai/sd-vae-ft-ema"


class VAENotFoundError(InputNotFound):
    """No VAE weights where the user pointed: the message says where we looked and how to get weights."""


@dataclass
class VAEConfig:
    """Shape of the autoencoder. One entry of `block_out_channels` per level; each level but the last halves
    the resolution, so the downsampling factor is 2 ** (levels - 1) and the block types follow from it.
    `kind` "kl" is a continuous AutoencoderKL, "vq" a VQModel with a codebook of `num_vq_embeddings` vectors
    of `vq_embed_dim` (default latent_channels) numbers each (the vq fields are ignored for "kl")."""

    kind: str = "kl"
    in_channels: int = 3
    latent_channels: int = 4
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    layers_per_block: int = 1
    norm_num_groups: int = 32
    sample_size: int = 32
    mid_block_add_attention: bool = True
    num_vq_embeddings: int = 256
    vq_embed_dim: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise ConfigError(f"vae model config: {msg}")

        if self.kind not in KINDS:
            bad(f"kind must be one of {list(KINDS)}, got {self.kind!r}")
        require_ranges(self, "vae model config", positive=("in_channels", "latent_channels", "layers_per_block",
                                                           "norm_num_groups", "sample_size", "vq_embed_dim"))
        if self.num_vq_embeddings < 2:
            bad(f"num_vq_embeddings must be at least 2, got {self.num_vq_embeddings}")
        if not self.block_out_channels:
            bad("block_out_channels must list at least one level")
        for c in self.block_out_channels:
            if c <= 0 or c % self.norm_num_groups:
                bad(f"block_out_channels {self.block_out_channels}: each must be a positive multiple of "
                    f"norm_num_groups ({self.norm_num_groups})")
        if self.sample_size % self.downsample_factor:
            bad(f"sample_size ({self.sample_size}) must be divisible by the downsampling factor "
                f"({self.downsample_factor})")

    @property
    def is_vq(self) -> bool:
        return self.kind == "vq"

    @property
    def num_levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (self.num_levels - 1)

    @property
    def latent_size(self) -> int:
        return self.sample_size // self.downsample_factor

    @property
    def down_block_types(self) -> tuple[str, ...]:
        return ("DownEncoderBlock2D",) * self.num_levels

    @property
    def up_block_types(self) -> tuple[str, ...]:
        return ("UpDecoderBlock2D",) * self.num_levels


@dataclass
class VAETrainConfig:
    """Training hyper-parameters. Losses are per-element means: recon over pixels ([-1, 1] scale), KL over
    latent elements, so `kl_weight` does not depend on the image size. A VQ model's codebook and commitment
    losses are means over the encoder's output elements."""

    lr: float = 1e-3
    batch_size: int = 32
    max_steps: int = 2000
    kl_weight: float = 1e-4  # KL only: a VQ model has no posterior, so vq ignores it
    recon_loss: str = "l1+mse"
    lr_schedule: str = "cosine"  # cosine decays to min_lr_ratio * lr at max_steps
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    save_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    hflip: bool = False  # random horizontal flips (a pure function of seed and step: resume-safe)
    split: str | None = "train"  # which split of the image folder to train on (None: all rows)
    stats_samples: int = 2048  # images used for the latent scale/shift at the end (KL only: codes need none)
    perceptual_weight: float = 0.0
    perceptual_weights_path: str | None = None  # a torchvision VGG16 state dict on disk; never downloaded
    # VQ only (ignored for kl): loss = recon + codebook + commitment_weight * commitment (VQ-VAE's beta)
    commitment_weight: float = 0.25
    dead_code_after: int = 50  # a code unused for this many steps restarts at a random encoder output; 0: never
    usage_window: int = 50  # steps over which codebook_usage and perplexity are counted

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise ConfigError(f"vae train config: {msg}")

        require_ranges(self, "vae train config",
                       positive=("lr", "batch_size", "max_steps", "save_every", "keep_checkpoints", "log_every",
                                 "stats_samples", "usage_window"),
                       non_negative=("kl_weight", "perceptual_weight", "weight_decay", "warmup_steps", "grad_clip",
                                     "commitment_weight", "dead_code_after"))
        if not 0 <= self.min_lr_ratio <= 1:
            bad(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.recon_loss not in RECON_LOSSES:
            bad(f"recon_loss must be one of {list(RECON_LOSSES)}, got {self.recon_loss!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            bad(f"lr_schedule must be one of {list(LR_SCHEDULES)}, got {self.lr_schedule!r}")


@dataclass
class VAERunConfig:
    """A `configs/vae/*.yaml` file: `model:` (the architecture) and `train:` (how to fit it)."""

    model: VAEConfig = field(default_factory=VAEConfig)
    train: VAETrainConfig = field(default_factory=VAETrainConfig)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> VAERunConfig:
        return load_yaml_config(cls, path, overrides)


def load_vae_config(path: str | Path, overrides: list[str] | None = None) -> VAERunConfig:
    """Strictly load a VAE YAML config (unknown keys fail with their path), applying `a.b=c` overrides."""
    return VAERunConfig.from_yaml(path, overrides)


# --------------------------------------------------------------------------------------------------
# building and loading


def build_vae(config: VAEConfig | VAERunConfig) -> Any:
    """A freshly initialised AutoencoderKL, or VQModel for kind "vq" (uses the global torch RNG: seed it first for
    reproducibility). Latent normalisation starts as identity (shift 0, scale 1) until `set_latent_stats`; a
    VQModel keeps scale 1 and looks its codes up in the codebook when decoding (`decode_codes`)."""
    from diffusers import AutoencoderKL, VQModel

    if isinstance(config, VAERunConfig):
        config = config.model
    shared: dict[str, Any] = {
        "in_channels": config.in_channels, "out_channels": config.in_channels,
        "down_block_types": config.down_block_types, "up_block_types": config.up_block_types,
        "block_out_channels": tuple(config.block_out_channels), "layers_per_block": config.layers_per_block,
        "latent_channels": config.latent_channels, "norm_num_groups": config.norm_num_groups,
        "sample_size": config.sample_size, "scaling_factor": 1.0,
        "mid_block_add_attention": config.mid_block_add_attention, "force_upcast": False}
    if config.is_vq:
        return VQModel(**shared, num_vq_embeddings=config.num_vq_embeddings, vq_embed_dim=config.vq_embed_dim,
                       lookup_from_codebook=True)
    return AutoencoderKL(**shared, shift_factor=0.0)


def _looks_like_hub_id(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name)) and not name.startswith((".", "/", "~"))


VAE_CLASSES = ("AutoencoderKL", "VQModel")


def _vae_class(class_name: str | None, where: str, hint: str) -> Any:
    """The diffusers class a config.json names (none: AutoencoderKL, as in configs older than `_class_name`)."""
    import diffusers

    name = class_name or "AutoencoderKL"
    if name not in VAE_CLASSES:
        raise VAENotFoundError(f"{where} holds a {name}, not one of {list(VAE_CLASSES)}; {hint}")
    return getattr(diffusers, name)


def load_vae(name_or_path: str | Path, device: str | torch.device | None = None) -> Any:
    """Load an AutoencoderKL or a VQModel (the class config.json's `_class_name` names) in eval mode from a
    `save_pretrained` directory or a Hugging Face Hub id.

    Hub ids (e.g. `stabilityai/sd-vae-ft-ema`, the SD 1.x VAE) need internet on first use; tests never
    take that path. Any failure is one line saying where we looked and how to get weights.
    """
    import json

    from diffusers import AutoencoderKL

    name = str(name_or_path)
    path = Path(name).expanduser()
    hint = ("train one with `tmot vae train --config configs/vae/tiny-32.yaml --data DIR --out DIR` "
            f"(vq-tiny-32.yaml for discrete codes) or pass a hub id such as {HUB_EXAMPLE} with internet access")
    if path.exists():
        if not (path / "config.json").is_file():
            raise VAENotFoundError(f"no VAE in {path}: expected config.json and diffusion_pytorch_model."
                                   f"safetensors written by save_pretrained; {hint}")
        try:
            class_name = json.loads((path / "config.json").read_text()).get("_class_name")
        except (ValueError, AttributeError) as err:
            raise VAENotFoundError(f"cannot load the VAE in {path}: config.json is not a JSON object "
                                   f"({type(err).__name__}); {hint}") from None
        cls = _vae_class(class_name, str(path), hint)
        try:
            vae = cls.from_pretrained(path, low_cpu_mem_usage=False)
        except Exception as err:  # noqa: BLE001 - one line for the user, whatever diffusers raised
            raise VAENotFoundError(f"cannot load the VAE in {path}: {str(err).splitlines()[0]}; {hint}") from None
    elif _looks_like_hub_id(name):
        try:
            cls = _vae_class(AutoencoderKL.load_config(name).get("_class_name"), name, hint)
            vae = cls.from_pretrained(name, low_cpu_mem_usage=False)
        except VAENotFoundError:
            raise
        except Exception as err:  # noqa: BLE001
            raise VAENotFoundError(
                f"no VAE at {name!r}: not a local directory, and the Hugging Face Hub id could not be loaded "
                f"({type(err).__name__}; offline?); {hint}") from None
    else:
        raise VAENotFoundError(f"no VAE at {name!r}: directory not found; {hint}")
    vae.eval().requires_grad_(False)
    if device is not None:
        vae.to(device)
    return vae


# --------------------------------------------------------------------------------------------------
# latent normalisation


def latent_scale_shift(vae: Any) -> tuple[float, float]:
    """(scaling_factor, shift_factor) from the VAE's config; a missing shift (SD 1.x VAEs) means 0. A VQModel's
    codes are indices, never scaled: (1.0, 0.0) whatever its config says."""
    if is_vq(vae):
        return 1.0, 0.0
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    return float(1.0 if scale is None else scale), float(0.0 if shift is None else shift)


def set_latent_stats(vae: Any, shift_factor: float, scaling_factor: float) -> None:
    """Store the normalisation in the model config so save_pretrained/from_pretrained carry it."""
    vae.register_to_config(shift_factor=float(shift_factor), scaling_factor=float(scaling_factor))


def encode(vae: Any, images: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
    """Images in [-1, 1] (B, C, H, W) -> normalised latents `(z - shift) * scale`, or for a VQModel its codes
    (B, h, w) int64 (`encode_codes`; deterministic, so `sample` and `generator` do not apply).

    `sample=False` takes the posterior mean (deterministic, what caches store); `sample=True` draws
    z ~ q(z|x) with `generator`."""
    if is_vq(vae):
        return encode_codes(vae, images)
    posterior = vae.encode(images.to(vae.dtype)).latent_dist
    z = posterior.sample(generator=generator) if sample else posterior.mean
    scale, shift = latent_scale_shift(vae)
    return (z - shift) * scale


def decode(vae: Any, latents: Tensor) -> Tensor:
    """Normalised latents (float, AutoencoderKL) or codes (integer (B, h, w), VQModel) -> images (about [-1, 1];
    clamp before saving). Inverse of `encode`."""
    if is_vq(vae):
        if latents.is_floating_point():
            raise InvalidInput(f"a VQModel decodes integer codes (B, h, w), got {latents.dtype} of shape "
                               f"{tuple(latents.shape)}: continuous latents need an AutoencoderKL")
        return decode_codes(vae, latents)
    if not latents.is_floating_point():
        raise InvalidInput(f"an AutoencoderKL decodes float latents, got {latents.dtype} of shape "
                           f"{tuple(latents.shape)}: integer codes need a VQModel")
    scale, shift = latent_scale_shift(vae)
    return vae.decode(latents.to(vae.dtype) / scale + shift).sample


# --------------------------------------------------------------------------------------------------
# discrete codes (VQModel)


def is_vq(vae: Any) -> bool:
    """Whether `vae` is a VQModel (its latents are codebook indices) rather than an AutoencoderKL."""
    from diffusers import VQModel

    return isinstance(vae, VQModel)


def codebook_size(vae: Any) -> int | None:
    """The number of codes K of a VQModel (its tokens are 0..K-1); None for an AutoencoderKL."""
    return int(vae.config.num_vq_embeddings) if is_vq(vae) else None


def image_shape(vae: Any, size: int) -> tuple[int, ...]:
    """What the autoencoder makes of a `size` px image: latents (C, h, w), or a VQModel's code grid (h, w)."""
    h = size // 2 ** (len(vae.config.block_out_channels) - 1)
    return (h, h) if is_vq(vae) else (int(vae.config.latent_channels), h, h)


def codebook(vq: Any) -> Tensor:
    """The (K, D) codebook of a VQModel (its parameter: gradients and in-place edits reach the model)."""
    return vq.quantize.embedding.weight


def pre_quant(vq: Any, images: Tensor) -> Tensor:
    """Images in [-1, 1] -> the encoder's continuous output (B, D, h, w) that the codebook quantises."""
    return vq.encode(images.to(vq.dtype)).latents


def nearest_codes(vectors: Tensor, book: Tensor) -> Tensor:
    """(N, D) vectors -> (N,) int64 index of the nearest codebook row (the first on a tie). Squared distances
    are summed from the differences, not expanded as |z|^2 + |e|^2 - 2 z.e, which cancels badly near ties;
    in chunks of at most 16M elements."""
    rows = max(1, (1 << 24) // max(1, book.numel()))
    book = book.detach().to(vectors.dtype)
    vectors = vectors.detach()
    return torch.cat([(part[:, None, :] - book[None]).pow(2).sum(-1).argmin(1) for part in vectors.split(rows)])


def quantize(vq: Any, h: Tensor) -> Tensor:
    """Pre-quantisation output (B, D, h, w) -> codes (B, h, w) int64."""
    b, d, hh, ww = h.shape
    return nearest_codes(h.permute(0, 2, 3, 1).reshape(-1, d), codebook(vq)).view(b, hh, ww)


def encode_codes(vq: Any, images: Tensor) -> Tensor:
    """Images in [-1, 1] (B, C, H, W) -> codes (B, h, w) int64: the nearest code at each latent position."""
    return quantize(vq, pre_quant(vq, images))


def decode_quantized(vq: Any, quant: Tensor) -> Tensor:
    """Codebook vectors (B, D, h, w) -> images: what VQModel.decode does once it has quantised (post-quant conv,
    then the decoder, which a "spatial" norm also conditions on the quantised vectors)."""
    return vq.decoder(vq.post_quant_conv(quant), quant if vq.config.norm_type == "spatial" else None)


def decode_codes(vq: Any, codes: Tensor) -> Tensor:
    """Codes (B, h, w) -> images (B, C, H, W), about [-1, 1]. Looks the codes up in the codebook itself, so it
    does not depend on the model's `lookup_from_codebook` setting."""
    if codes.dim() != 3 or codes.is_floating_point():
        raise InvalidInput(f"codes must be an integer tensor (B, h, w), got {codes.dtype} of shape "
                           f"{tuple(codes.shape)}")
    k = codebook_size(vq)
    if codes.numel() and not (0 <= int(codes.min()) and int(codes.max()) < k):
        raise InvalidInput(f"codes must lie in [0, {k}), got values in [{int(codes.min())}, {int(codes.max())}]")
    b, hh, ww = codes.shape
    book = codebook(vq)
    quant = book[codes.to(book.device, torch.long).reshape(-1)].view(b, hh, ww, -1).permute(0, 3, 1, 2)
    return decode_quantized(vq, quant.contiguous())


def usage_and_perplexity(counts: Tensor) -> tuple[float, float]:
    """Per-code counts (K,) -> (fraction of the K codes used at least once, perplexity): the exponential of the
    entropy of the code frequencies, K when all codes are used equally often, 1 when one code takes all."""
    counts = counts.double()
    total = float(counts.sum())
    if total <= 0:
        return 0.0, 0.0
    p = counts[counts > 0] / total
    return float((counts > 0).double().mean()), float(torch.exp(-(p * p.log()).sum()))


class LatentStats(NamedTuple):
    shift_factor: float  # mean of the raw latents
    scaling_factor: float  # 1 / std of the raw latents
    mean: float
    std: float
    count: int  # latent elements the statistics were computed over
    images: int


def _item_image(item: Any) -> Tensor:
    if isinstance(item, Tensor):
        return item
    if isinstance(item, dict):
        return item["image"]
    if isinstance(item, (tuple, list)):
        return item[0]
    raise TypeError(f"dataset items must be tensors, (tensor, ...) or {{'image': tensor}}; got {type(item).__name__}")


@torch.no_grad()
def compute_latent_stats(vae: Any, dataset: Iterable[Any] | Any, n: int = 2048, batch_size: int = 64,
                         sample: bool = False) -> LatentStats:
    """Scale and shift from data, as Stable Diffusion did: shift = mean, scale = 1/std (unbiased) of the raw
    latents (posterior means unless `sample`) of the first `n` images. Sums are in float64 so one pass over
    a large set stays accurate without holding the latents. Does not modify the VAE (see set_latent_stats).
    KL only: a VQModel's codes are never scaled."""
    if is_vq(vae):
        raise InvalidInput("latent statistics apply to an AutoencoderKL's latents; a VQModel's codes need none")
    was_training = vae.training
    vae.eval()
    total, total_sq, count, images = 0.0, 0.0, 0, 0
    num = min(n, len(dataset)) if hasattr(dataset, "__len__") else n
    buf: list[Tensor] = []

    def flush() -> None:
        nonlocal total, total_sq, count
        x = torch.stack(buf).to(device=vae.device, dtype=vae.dtype)
        posterior = vae.encode(x).latent_dist
        z = (posterior.sample() if sample else posterior.mean).double()
        total += float(z.sum())
        total_sq += float((z * z).sum())
        count += z.numel()
        buf.clear()

    if hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"):
        items: Iterable[Any] = (dataset[i] for i in range(num))
    else:
        items = dataset
    for item in items:
        if images >= num:
            break
        buf.append(_item_image(item))
        images += 1
        if len(buf) == batch_size:
            flush()
    if buf:
        flush()
    if was_training:
        vae.train()
    if count < 2:
        raise ValueError("compute_latent_stats: need at least one image")
    mean = total / count
    var = max((total_sq - count * mean * mean) / (count - 1), 1e-12)
    std = math.sqrt(var)
    return LatentStats(shift_factor=mean, scaling_factor=1.0 / std, mean=mean, std=std, count=count, images=images)


# --------------------------------------------------------------------------------------------------
# metrics


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] float images -> the uint8 values a PNG of them would hold (as float for arithmetic)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round()


def psnr_per_image(original: Tensor, reconstruction: Tensor) -> Tensor:
    """PSNR in dB of each image on the uint8 scale (both inputs in [-1, 1]); identical images give 100 dB
    (MSE floored at 255^2 * 1e-10) so a mean stays finite."""
    a, b = to_uint8(original), to_uint8(reconstruction)
    mse = ((a - b) ** 2).flatten(1).mean(1).clamp_min(255.0**2 * 1e-10)
    return 10 * torch.log10(255.0**2 / mse)
