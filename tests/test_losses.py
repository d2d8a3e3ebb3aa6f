"""(g) A tiny model overfits a fixed batch of two image-caption samples: both losses fall by > 90%."""

import pytest
import torch
from helpers import tiny_config

from transfusion_mot.batch import Collator, Sample
from transfusion_mot.diffusion import make_objective
from transfusion_mot.losses import transfusion_loss
from transfusion_mot.model import TransfusionMoT


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_tiny_model_overfits_fixed_batch(objective):
    cfg = tiny_config(dim=64, n_layers=2, objective=objective)
    model = TransfusionMoT(cfg)
    g = torch.Generator().manual_seed(0)
    samples = [Sample([[3, 1, 4, 1, 5, 9, 2, 6], torch.randn(4, 4, 4, generator=g)]),
               Sample([[2, 7, 1, 8, 2, 8], torch.randn(4, 4, 4, generator=g)])]
    batch = Collator(cfg).collate_padded(samples)
    objective_ = make_objective(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    history = []
    for _ in range(150):
        # the same timesteps and noise every step: a truly fixed batch
        out = transfusion_loss(model, batch, objective_, torch.Generator().manual_seed(1))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        history.append((out["text_loss"].item(), out["image_loss"].item()))
    (text0, image0), (text1, image1) = history[0], history[-1]
    assert text1 < 0.1 * text0, history[::25]
    assert image1 < 0.1 * image0, history[::25]
