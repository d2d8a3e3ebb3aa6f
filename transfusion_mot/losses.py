"""The training objectives, with the text and image terms reported separately: Transfusion's
L = L_LM + lambda * L_diff (continuous latents) and Chameleon's next-token loss on text and image codes
(`image_objective: tokens`), L = L_LM + lambda * L_codes; and the loss as a module (`TransfusionStep`), the
root that FSDP2 shards."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .batch import IGNORE_INDEX, Batch
from .diffusion import DiffusionObjective
from .model import Routing, TransfusionMoT


def transfusion_loss(model: TransfusionMoT, batch: Batch, objective: DiffusionObjective,
                     generator: torch.Generator | None = None, image_loss_weight: float | None = None,
                     check: bool = True, timesteps: Tensor | None = None, noise: Tensor | None = None,
                     details: bool = False) -> dict[str, Tensor]:
    """Noise the batch's images, run the model once, return {loss, text_loss, image_loss}.

    text_loss: next-token cross-entropy averaged over positions with a text target.
    image_loss: MSE between predicted and target (epsilon or velocity) over all latent patch elements.
    Random draws (timesteps, noise) come from `generator` on the CPU, so a seeded run is reproducible on
    any device and resumes exactly; `timesteps` (I,) and `noise` (P, patch_dim) replace the draws (fixed
    validation draws). `details` adds sums for held-out evaluation: `text_nll_sum` and `text_tokens`
    (cross-entropy summed over text targets, and their count) and `image_mse_per_image` (I,).
    """
    weight = model.config.image_loss_weight if image_loss_weight is None else image_loss_weight
    inputs = batch.inputs
    device = inputs.tokens.device
    if timesteps is None:
        timesteps = objective.sample_timesteps(batch.image_first, generator)
    timesteps = timesteps.to(device)
    if noise is None:
        noise = torch.randn(inputs.patches.shape, generator=generator)
    noise = noise.to(device=device, dtype=inputs.patches.dtype)
    noisy = objective.add_noise(inputs.patches, noise, timesteps[inputs.patch_image])
    hidden, routing = model.forward_stream(batch.noised(noisy, timesteps), check=check)  # the stream's parts
    # each modality's rows, in row-major order: image rows in the order of the patches
    image_hidden = routing.by_modality(hidden, model.config.num_modalities)[model.image_modality]
    out, text_loss = _text_loss(model, batch, hidden, routing, details)
    prediction = model.image_head(image_hidden)
    if inputs.patches.shape[0]:
        image_loss = objective.loss(prediction, inputs.patches, noise)
        if details:
            sq = (prediction.float() - objective.target(inputs.patches, noise).float()).pow(2).mean(dim=1)  # (P,)
            per_image = torch.zeros(batch.num_images, device=device).index_add_(0, inputs.patch_image, sq)
            patches_per_image = torch.bincount(inputs.patch_image, minlength=batch.num_images)
            out["image_mse_per_image"] = per_image / patches_per_image.clamp(min=1)
    else:
        image_loss = prediction.float().sum() * 0.0
        if details:
            out["image_mse_per_image"] = image_hidden.new_zeros(0)
    out.update(loss=text_loss + weight * image_loss, text_loss=text_loss, image_loss=image_loss)
    return out


def _text_loss(model: TransfusionMoT, batch: Batch, hidden: list[Tensor], routing: Routing,
               details: bool) -> tuple[dict[str, Tensor], Tensor]:
    """The next-token loss on text targets of a forward's stream (`hidden`, its parts): ({text_nll_sum,
    text_tokens} when `details`, the mean over targets). The LM head runs even on an empty selection, so its
    gradient is zero rather than missing (FSDP2 needs every process to reduce the same gradients); text rows
    without a next-token target (before an image, at the end) are ignored by the cross-entropy."""
    modalities = model.config.num_modalities
    text_hidden = routing.by_modality(hidden, modalities)[model.text_modality]
    targets = routing.by_modality(routing.sort(batch.text_targets.reshape(-1)), modalities)[model.text_modality]
    logits = model.text_logits(text_hidden).float()
    text_tokens = (targets != IGNORE_INDEX).sum()
    text_nll_sum = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    out = {"text_nll_sum": text_nll_sum, "text_tokens": text_tokens} if details else {}
    return out, text_nll_sum / text_tokens.clamp(min=1)  # the mean over targets, with no host sync


def chameleon_loss(model: TransfusionMoT, batch: Batch, image_loss_weight: float | None = None,
                   check: bool = True, details: bool = False, **_draws: Any) -> dict[str, Tensor]:
    """Chameleon's objective (`image_objective: tokens`): next-token cross-entropy on text targets and on image
    codes, {loss = text_loss + lambda * image_loss, text_loss, image_loss}, each the mean over its own targets.

    Image targets are the positions whose next position is a code (the BOI, a text position, predicts the
    first code): their hidden states go through the code head, whatever expert produced them. There is no
    noise and no timestep, so a batch gives the same loss every time (`_draws`: the diffusion objective's,
    ignored). `details` adds the text sums and `image_nll_per_image` (I,), each image's mean code NLL.
    """
    weight = model.config.image_loss_weight if image_loss_weight is None else image_loss_weight
    hidden, routing = model.forward_stream(batch.inputs, check=check)  # the stream's parts
    out, text_loss = _text_loss(model, batch, hidden, routing, details)
    # image targets sit on both modalities' rows (the BOI is text): each part's target rows, joined
    targets = routing.sort(batch.image_targets.reshape(-1))
    rows = [(part != IGNORE_INDEX).nonzero().squeeze(1) for part in targets]  # one host sync per part

    def at_targets(parts: list[Tensor]) -> Tensor:
        return routing.join([part.index_select(0, r) for part, r in zip(parts, rows)])

    # the head runs on zero rows too (text-only batches): a zero gradient, never a missing one
    logits = model.image_logits(at_targets(hidden)).float()
    codes = at_targets(targets)
    nll = F.cross_entropy(logits, codes, reduction="none")  # (T,)
    image_loss = nll.mean() if codes.numel() else logits.sum() * 0.0
    if details:
        # the image of each target: the image of the code it predicts (the next position's image id)
        next_image = torch.roll(batch.inputs.image_ids, -1, dims=1).reshape(-1)
        image_of = at_targets(routing.sort(next_image))
        sums = torch.zeros(batch.num_images, device=nll.device).index_add_(0, image_of, nll.detach())
        counts = torch.bincount(image_of, minlength=batch.num_images)
        out["image_nll_per_image"] = sums / counts.clamp(min=1)
    out.update(loss=text_loss + weight * image_loss, text_loss=text_loss, image_loss=image_loss)
    return out


class TransfusionStep(nn.Module):
    """The loss as a module, so that under FSDP2 the heads run inside the root's forward (the root module is
    what gets sharded last). Holds the plain model and its diffusion objective (unused with image tokens);
    its parameters are the model's."""

    def __init__(self, model: TransfusionMoT, objective: DiffusionObjective) -> None:
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch: Batch, generator: torch.Generator | None = None, **draws: Any) -> dict[str, Tensor]:
        """Training: draws from `generator`. Validation: fixed `timesteps`, `noise` and `details=True`."""
        if self.model.config.image_tokens:
            return chameleon_loss(self.model, batch, **draws)
        return transfusion_loss(self.model, batch, self.objective, generator, **draws)
