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


@pytest.mark.parametrize("untie,conditioning", [(["attn", "ffn", "norm"], "add"), ([], "add"),
                                                (["attn", "ffn", "norm"], "adaln")])
def test_every_parameter_gets_a_gradient_from_a_text_only_batch(untie, conditioning):
    """FSDP2 reduce-scatters the same gradients on every process, so a process whose micro-batch holds
    no image must still produce (zero) gradients for the image experts and the image end."""
    cfg = tiny_config(dim=32, n_layers=2, untie=untie, time_conditioning=conditioning)
    model = TransfusionMoT(cfg)
    batch = Collator(cfg).collate_padded([Sample([[3, 1, 4, 1, 5]]), Sample([[2, 7]])])
    assert batch.inputs.patches.shape[0] == 0
    out = transfusion_loss(model, batch, make_objective(cfg), torch.Generator().manual_seed(0))
    out["loss"].backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing
    assert out["image_loss"].item() == 0.0 and out["text_loss"].item() > 0
    # the image end's gradients are exactly zero; the text end's are not
    assert model.image_head.weight.grad.abs().max().item() == 0.0
    assert model.lm_head.weight.grad.abs().max().item() > 0
    if untie:
        image_expert = model.blocks[0].ffn[model.image_modality]
        assert all(p.grad.abs().max().item() == 0.0 for p in image_expert.parameters())


def test_text_only_rows_give_the_same_text_loss_as_before_the_zero_row_experts():
    """Running absent experts on zero rows changes nothing the loss computes: a naive per-modality
    reference (the dense model with the text expert's weights) gives the same hidden states."""
    cfg = tiny_config(dim=32, n_layers=2)
    mot = TransfusionMoT(cfg).eval()
    dense = TransfusionMoT(tiny_config(dim=32, n_layers=2, untie=[])).eval()
    text = mot.config.modalities.index("text")
    state = {}
    for name, tensor in mot.state_dict().items():  # experts.<text>.X -> experts.0.X; drop the image copies
        parts = name.split(".")
        for i, part in enumerate(parts[:-1]):
            if part.isdigit() and parts[i - 1] in ("qkv", "out", "q_norm", "k_norm", "attn_norm", "ffn_norm",
                                                   "ffn", "final_norm"):
                if int(part) != text:
                    break
                parts[i] = "0"
        else:
            state[".".join(parts)] = tensor
    dense.load_state_dict(state)
    batch = Collator(cfg).collate_padded([Sample([[3, 1, 4, 1, 5]]), Sample([[2, 7]])])
    inputs = batch.noised(batch.inputs.patches, torch.zeros(0))
    torch.testing.assert_close(mot(inputs), dense(inputs), rtol=1e-5, atol=1e-6)
