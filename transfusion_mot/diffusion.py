"""Diffusion objectives behind one interface, with the schedule arithmetic taken from diffusers.

DDPM (Transfusion): epsilon prediction, cosine schedule ("squaredcos_cap_v2"), T = 1000 discrete steps;
x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, target eps.
Rectified flow (BAGEL, SD3): sigma ~ logit-normal, x_sigma = (1 - sigma) x_0 + sigma eps, target the
velocity eps - x_0 (diffusers' FlowMatchEuler convention, so its scheduler samples our models).

Timesteps given to the model are always on the [0, T] scale (sigma * T for flow), so both objectives share
the timestep embedder. Image-first (captioning) samples draw t <= image_first_max_t (Transfusion caps at
500 of 1000 so the model mostly sees clean images when it writes captions).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common.errors import InvalidInput
from .config import ModelConfig


class DiffusionObjective:
    name = "base"

    def __init__(self, config: ModelConfig) -> None:
        self.num_train_timesteps = config.num_train_timesteps
        self.image_first_max_t = config.image_first_max_t

    def sample_timesteps(self, image_first: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One timestep per image on the [0, T] scale (float), capped for image-first images."""
        raise NotImplementedError

    def add_noise(self, clean: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """Noisy patches; `timesteps` is per patch (P,)."""
        raise NotImplementedError

    def target(self, clean: Tensor, noise: Tensor) -> Tensor:
        raise NotImplementedError

    def loss(self, prediction: Tensor, clean: Tensor, noise: Tensor) -> Tensor:
        """Mean squared error over every element of every patch."""
        return torch.mean((prediction.float() - self.target(clean, noise).float()) ** 2)

    def make_scheduler(self, kind: str | None = None):
        """A diffusers scheduler configured to sample this objective's models."""
        raise NotImplementedError

    def clean_estimate(self, prediction: Tensor, noisy: Tensor, timestep: float) -> Tensor:
        """The clean latent x_0 a prediction implies at `timestep` (one, on the [0, T] scale) for `noisy`."""
        raise NotImplementedError

    def prediction_from_clean(self, clean: Tensor, noisy: Tensor, timestep: float) -> Tensor:
        """The inverse of `clean_estimate`: the prediction that implies `clean` for `noisy` at `timestep`."""
        raise NotImplementedError


class DDPMObjective(DiffusionObjective):
    name = "ddpm"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        from diffusers import DDPMScheduler

        self.scheduler = DDPMScheduler(num_train_timesteps=config.num_train_timesteps,
                                       beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                                       clip_sample=False)

    def sample_timesteps(self, image_first: Tensor, generator: torch.Generator | None = None) -> Tensor:
        n = image_first.shape[0]
        full = torch.randint(0, self.num_train_timesteps, (n,), generator=generator)
        capped = torch.randint(0, self.image_first_max_t + 1, (n,), generator=generator)
        return torch.where(image_first.cpu(), capped, full).float()

    def add_noise(self, clean: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        return self.scheduler.add_noise(clean, noise, timesteps.long())

    def target(self, clean: Tensor, noise: Tensor) -> Tensor:
        return noise

    def make_scheduler(self, kind: str | None = None):
        from diffusers import DDIMScheduler, DDPMScheduler

        kind = kind or "ddpm"
        common = dict(num_train_timesteps=self.num_train_timesteps, beta_schedule="squaredcos_cap_v2",
                      prediction_type="epsilon", clip_sample=False)
        if kind == "ddpm":
            return DDPMScheduler(**common)
        if kind == "ddim":
            return DDIMScheduler(**common, set_alpha_to_one=False)
        raise InvalidInput(f"scheduler {kind!r} cannot sample a DDPM (epsilon) model; use ddpm or ddim")

    def _signal_noise(self, timestep: float) -> tuple[float, float]:
        abar = float(self.scheduler.alphas_cumprod[int(timestep)])
        return abar ** 0.5, (1.0 - abar) ** 0.5

    def clean_estimate(self, prediction: Tensor, noisy: Tensor, timestep: float) -> Tensor:
        signal, noise = self._signal_noise(timestep)
        return (noisy - noise * prediction) / signal

    def prediction_from_clean(self, clean: Tensor, noisy: Tensor, timestep: float) -> Tensor:
        signal, noise = self._signal_noise(timestep)
        return (noisy - signal * clean) / noise


class FlowObjective(DiffusionObjective):
    name = "flow"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.logit_mean = config.flow_logit_mean
        self.logit_std = config.flow_logit_std

    def sample_timesteps(self, image_first: Tensor, generator: torch.Generator | None = None) -> Tensor:
        # SD3's logit-normal density, the same draws as diffusers' compute_density_for_timestep_sampling
        # ("logit_normal"; tested): written out because importing diffusers.training_utils costs every training
        # process 3 s (it pulls in diffusers' models and PEFT)
        n = image_first.shape[0]
        sigma = torch.sigmoid(torch.normal(self.logit_mean, self.logit_std, size=(n,), generator=generator))
        cap = self.image_first_max_t / self.num_train_timesteps
        sigma = torch.where(image_first.cpu(), sigma * cap, sigma)
        return sigma * self.num_train_timesteps

    def add_noise(self, clean: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        sigma = (timesteps / self.num_train_timesteps).to(clean.dtype)[:, None]
        return (1.0 - sigma) * clean + sigma * noise

    def target(self, clean: Tensor, noise: Tensor) -> Tensor:
        return noise - clean

    def make_scheduler(self, kind: str | None = None):
        from diffusers import FlowMatchEulerDiscreteScheduler

        kind = kind or "flow"
        if kind != "flow":
            raise InvalidInput(f"scheduler {kind!r} cannot sample a flow (velocity) model; use flow")
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.num_train_timesteps, shift=1.0)

    def clean_estimate(self, prediction: Tensor, noisy: Tensor, timestep: float) -> Tensor:
        # x_sigma = x_0 + sigma * (eps - x_0)
        return noisy - (float(timestep) / self.num_train_timesteps) * prediction

    def prediction_from_clean(self, clean: Tensor, noisy: Tensor, timestep: float) -> Tensor:
        # sigma > 0 at every step a sampler takes (its last step goes from sigma_1 > 0 to 0)
        return (noisy - clean) / (float(timestep) / self.num_train_timesteps)


def make_objective(config: ModelConfig) -> DiffusionObjective:
    return {"ddpm": DDPMObjective, "flow": FlowObjective}[config.objective](config)
