"""Optimiser pieces: the warm-up + cosine schedule and the EMA, against closed forms."""


import torch

from transfusion_mot.training.optim import EMA, param_groups


def test_ema_matches_recurrence_and_round_trips():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.shadow["weight"], 0.9 * start + 0.1 * (start + 1.0))
    other = EMA(torch.nn.Linear(3, 2), decay=0.9)
    other.load_state_dict(ema.state_dict())
    target = torch.nn.Linear(3, 2)
    other.copy_to(target)
    torch.testing.assert_close(target.weight, ema.shadow["weight"])


def test_no_weight_decay_on_norms_and_biases():
    groups = param_groups(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.RMSNorm(4)), 0.1)
    assert [p.dim() for p in groups[0]["params"]] == [2] and groups[0]["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0.0
