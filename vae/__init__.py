"""Image autoencoder for transfusion-mot: a small diffusers AutoencoderKL, its training, latent caches
and reconstruction checks. Depends on transfusion_mot only for its format utilities (the strict config
loader and the image-folder reader), never on model or training code."""

from .autoencoder import (HUB_EXAMPLE, LatentStats, VAEConfig, VAENotFoundError, VAERunConfig, VAETrainConfig,
                          build_vae, compute_latent_stats, decode, encode, latent_scale_shift, load_vae,
                          load_vae_config, psnr_per_image, set_latent_stats)
from .data import ImageFolderDataset, ImageFolderError, collate_images, load_image, read_metadata
from .latents import LatentDataset, LatentStream, encode_folder
from .reconstruct import evaluate_psnr, reconstruct
from .train import latest_checkpoint, train_vae

__all__ = [
    "HUB_EXAMPLE", "ImageFolderDataset", "ImageFolderError", "LatentDataset", "LatentStats", "LatentStream",
    "VAEConfig", "VAENotFoundError", "VAERunConfig", "VAETrainConfig", "build_vae", "collate_images",
    "compute_latent_stats", "decode", "encode", "encode_folder", "evaluate_psnr", "latent_scale_shift",
    "latest_checkpoint", "load_image", "load_vae", "load_vae_config", "psnr_per_image", "read_metadata",
    "reconstruct", "set_latent_stats", "train_vae",
]
