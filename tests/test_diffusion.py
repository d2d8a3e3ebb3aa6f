"""(f) DDPM and rectified-flow losses equal a hand-written computation on a fixed seed."""

import math

import pytest
import torch
from helpers import random_samples, tiny_config

from transfusion_mot.batch import IGNORE_INDEX, Collator
from transfusion_mot.diffusion import make_objective
from transfusion_mot.losses import transfusion_loss
from transfusion_mot.model import TransfusionMoT


def cosine_alphas_cumprod(T=1000, s=0.008):
    """Nichol & Dhariwal's cosine schedule, discretised with betas clipped at 0.999."""
    def abar(t):
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    betas = [min(1 - abar(i + 1) / abar(i), 0.999) for i in range(T)]
    out, prod = [], 1.0
    for b in betas:
        prod *= 1 - b
        out.append(prod)
    return torch.tensor(out, dtype=torch.float64)


def test_ddpm_schedule_is_cosine():
    obj = make_objective(tiny_config(objective="ddpm"))
    torch.testing.assert_close(obj.scheduler.alphas_cumprod.double(), cosine_alphas_cumprod(), atol=1e-6, rtol=1e-5)


def hand_loss(model, batch, objective_name, seed, weight=5.0):
    g = torch.Generator().manual_seed(seed)
    n_img = batch.num_images
    if objective_name == "ddpm":
        full = torch.randint(0, 1000, (n_img,), generator=g)
        capped = torch.randint(0, 501, (n_img,), generator=g)
        t = torch.where(batch.image_first, capped, full)
        noise = torch.randn(batch.inputs.patches.shape, generator=g)
        abar = cosine_alphas_cumprod().float()[t][batch.inputs.patch_image][:, None]
        noisy = abar.sqrt() * batch.inputs.patches + (1 - abar).sqrt() * noise
        target = noise
        t_model = t.float()
    else:
        sigma = torch.sigmoid(torch.normal(0.0, 1.0, (n_img,), generator=g))
        sigma = torch.where(batch.image_first, sigma * 0.5, sigma)
        noise = torch.randn(batch.inputs.patches.shape, generator=g)
        s = sigma[batch.inputs.patch_image][:, None]
        noisy = (1 - s) * batch.inputs.patches + s * noise
        target = noise - batch.inputs.patches
        t_model = sigma * 1000
    hidden = model(batch.noised(noisy, t_model))
    # cross-entropy by hand: -log softmax at the target, averaged over positions with a target
    nll = []
    for b in range(hidden.shape[0]):
        for i in range(hidden.shape[1]):
            tgt = batch.text_targets[b, i].item()
            if tgt != IGNORE_INDEX:
                logits = model.lm_head(hidden[b, i])
                nll.append(torch.logsumexp(logits, 0) - logits[tgt])
    text_loss = torch.stack(nll).mean()
    pred = model.image_head(hidden[batch.inputs.modality == model.image_modality])
    image_loss = ((pred - target) ** 2).sum() / target.numel()
    return text_loss, image_loss, text_loss + weight * image_loss


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_loss_equals_hand_computation(objective):
    cfg = tiny_config(objective=objective)
    model = TransfusionMoT(cfg)
    with torch.no_grad():
        model.image_head.weight.normal_(0, 0.05)  # non-zero predictions
    batch = Collator(cfg).collate_padded(random_samples(cfg, n=3))
    assert batch.image_first.any() and (~batch.image_first).any()
    obj = make_objective(cfg)
    with torch.no_grad():
        ours = transfusion_loss(model, batch, obj, torch.Generator().manual_seed(5))
        ref_text, ref_image, ref_total = hand_loss(model, batch, objective, seed=5)
    torch.testing.assert_close(ours["text_loss"], ref_text, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours["image_loss"], ref_image, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours["loss"], ref_total, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_image_first_timesteps_are_capped(objective):
    cfg = tiny_config(objective=objective, image_first_max_t=500)
    obj = make_objective(cfg)
    g = torch.Generator().manual_seed(0)
    flags = torch.tensor([True, False] * 2000)
    t = obj.sample_timesteps(flags, g)
    assert t[flags].max() <= 500 and t[flags].min() >= 0
    assert t[~flags].max() > 900  # the uncapped ones span the whole range
    assert t[~flags].max() < 1000


def test_flow_timesteps_are_diffusers_logit_normal_draws():
    from diffusers.training_utils import compute_density_for_timestep_sampling

    cfg = tiny_config(objective="flow", flow_logit_mean=0.3, flow_logit_std=1.2, image_first_max_t=500)
    flags = torch.tensor([False, True, False, False, True, False])
    ours = make_objective(cfg).sample_timesteps(flags, torch.Generator().manual_seed(7))
    u = compute_density_for_timestep_sampling("logit_normal", 6, logit_mean=0.3, logit_std=1.2,
                                              generator=torch.Generator().manual_seed(7))
    assert torch.equal(ours, torch.where(flags, u * 0.5, u) * 1000)


def test_flow_add_noise_and_target():
    cfg = tiny_config(objective="flow")
    obj = make_objective(cfg)
    x0, eps = torch.randn(3, 16), torch.randn(3, 16)
    t = torch.tensor([0.0, 250.0, 1000.0])
    noisy = obj.add_noise(x0, eps, t)
    torch.testing.assert_close(noisy[0], x0[0])
    torch.testing.assert_close(noisy[2], eps[2])
    torch.testing.assert_close(noisy[1], 0.75 * x0[1] + 0.25 * eps[1])
    torch.testing.assert_close(obj.target(x0, eps), eps - x0)


def test_schedulers_match_objectives():
    ddpm = make_objective(tiny_config(objective="ddpm"))
    assert type(ddpm.make_scheduler("ddim")).__name__ == "DDIMScheduler"
    with pytest.raises(ValueError, match="cannot sample"):
        ddpm.make_scheduler("flow")
    flow = make_objective(tiny_config(objective="flow"))
    assert type(flow.make_scheduler()).__name__ == "FlowMatchEulerDiscreteScheduler"
    with pytest.raises(ValueError, match="cannot sample"):
        flow.make_scheduler("ddpm")
