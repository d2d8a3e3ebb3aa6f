"""Image autoencoder for transfusion-mot: a small diffusers AutoencoderKL, its training, latent caches
and reconstruction checks. Depends on transfusion_mot only for its model-free building blocks
(`transfusion_mot.common`) and its image-folder reader (`transfusion_mot.data`), never on model or
training code. Latent caches are read by `transfusion_mot.data.latents`."""

from .autoencoder import (
                          HUB_EXAMPLE,
                          LatentStats,
                          VAEConfig,
                          VAENotFoundError,
                          VAERunConfig,
                          VAETrainConfig,
                          build_vae,
                          compute_latent_stats,
                          decode,
                          encode,
                          latent_scale_shift,
                          load_vae,
                          load_vae_config,
                          psnr_per_image,
                          set_latent_stats,
)
from .latents import encode_folder
from .reconstruct import evaluate_psnr, reconstruct
from .train import train_vae

__all__ = [
    "HUB_EXAMPLE", "LatentStats", "VAEConfig", "VAENotFoundError", "VAERunConfig",
    "VAETrainConfig", "build_vae", "compute_latent_stats", "decode", "encode", "encode_folder", "evaluate_psnr",
    "latent_scale_shift", "load_vae", "load_vae_config", "psnr_per_image", "reconstruct", "set_latent_stats",
    "train_vae",
]
