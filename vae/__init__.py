"""Image autoencoders for transfusion-mot: a small diffusers AutoencoderKL (continuous latents) or VQModel (discrete
codes, images as tokens), their training, latent and code caches and reconstruction checks. Depends on
transfusion_mot only for its model-free building blocks (`transfusion_mot.common`) and its image-folder reader
(`transfusion_mot.data`), never on model or training code. Caches are read by `transfusion_mot.data.latents`."""

from .autoencoder import (
                          HUB_EXAMPLE,
                          LatentStats,
                          VAEConfig,
                          VAENotFoundError,
                          VAERunConfig,
                          VAETrainConfig,
                          build_vae,
                          codebook_size,
                          compute_latent_stats,
                          decode,
                          decode_codes,
                          encode,
                          encode_codes,
                          image_shape,
                          is_vq,
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
    "VAETrainConfig", "build_vae", "codebook_size", "compute_latent_stats", "decode", "decode_codes", "encode",
    "encode_codes", "encode_folder", "evaluate_psnr", "image_shape", "is_vq", "latent_scale_shift", "load_vae", "load_vae_config",
    "psnr_per_image", "reconstruct", "set_latent_stats", "train_vae",
]
