"""The Transfusion objective: L = L_LM + lambda * L_diff, with both terms reported separately."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .batch import IGNORE_INDEX, Batch
from .diffusion import DiffusionObjective
from .model import TransfusionMoT


def transfusion_loss(model: TransfusionMoT, batch: Batch, objective: DiffusionObjective,
                     generator: torch.Generator | None = None, image_loss_weight: float | None = None,
                     check: bool = True) -> dict[str, Tensor]:
    """Noise the batch's images, run the model once, return {loss, text_loss, image_loss}.

    text_loss: next-token cross-entropy averaged over positions with a text target.
    image_loss: MSE between predicted and target (epsilon or velocity) over all latent patch elements.
    Random draws (timesteps, noise) come from `generator` on the CPU, so a seeded run is reproducible on
    any device and resumes exactly.
    """
    weight = model.config.image_loss_weight if image_loss_weight is None else image_loss_weight
    device = batch.tokens.device
    timesteps = objective.sample_timesteps(batch.image_first, generator).to(device)
    noise = torch.randn(batch.patches.shape, generator=generator).to(device=device, dtype=batch.patches.dtype)
    noisy = objective.add_noise(batch.patches, noise, timesteps[batch.patch_image])
    hidden = model(batch.model_inputs(noisy, timesteps), check=check)

    text_positions = batch.text_targets != IGNORE_INDEX
    if text_positions.any():
        logits = model.lm_head(hidden[text_positions])
        text_loss = F.cross_entropy(logits.float(), batch.text_targets[text_positions])
    else:
        text_loss = hidden.sum() * 0.0
    image_positions = batch.modality == model.image_modality
    if batch.patches.shape[0]:
        prediction = model.image_head(hidden[image_positions])
        image_loss = objective.loss(prediction, batch.patches, noise)
    else:
        image_loss = hidden.sum() * 0.0
    return {"loss": text_loss + weight * image_loss, "text_loss": text_loss, "image_loss": image_loss}
