"""Optimiser pieces: the warm-up + cosine schedule and the EMA, against closed forms."""


import torch

from transfusion_mot.model import parameter_owners
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


def test_ema_under_fsdp2_runs_one_foreach_over_local_shards(tmp_path, monkeypatch):
    """Under FSDP2 the EMA update hands plain (local) tensors to one fused op; DTensors there would cost a
    Python-level dispatch per tensor. The average equals the unsharded EMA's."""
    from helpers import process_group
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 2))
    sharded = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 2))
    sharded.load_state_dict(plain.state_dict())
    calls = []
    real = torch._foreach_lerp_

    def recording(shadows, weights, weight):
        calls.append([type(t).__name__ for t in list(shadows) + list(weights)])
        return real(shadows, weights, weight)

    monkeypatch.setattr(torch, "_foreach_lerp_", recording)
    with process_group(0, 1, tmp_path):
        fully_shard(sharded)
        ema, ema_plain = EMA(sharded, 0.9), EMA(plain, 0.9)
        for step in range(3):
            with torch.no_grad():
                for a, b in zip(plain.parameters(), sharded.parameters()):
                    a.add_(0.1 * (step + 1))
                    b.add_(0.1 * (step + 1))
            ema.update(sharded)
            ema_plain.update(plain)
        assert len(calls) == 6 and all(kind == "Tensor" for call in calls for kind in call)
        for name, shadow in ema.shadow.items():
            torch.testing.assert_close(shadow.full_tensor(), ema_plain.shadow[name], rtol=0, atol=0)


def test_freezing_an_owner_leaves_it_out_of_the_optimizer_and_the_ema():
    from helpers import tiny_config

    from transfusion_mot.model import TransfusionMoT, freeze_parameters

    model = TransfusionMoT(tiny_config(untie=["attn", "ffn"]))
    owners = parameter_owners(model)
    assert set(owners.values()) == {"text", "image", "shared"}  # norms are not untied: shared
    frozen = freeze_parameters(model, ["text"])
    assert set(frozen) == {n for n, o in owners.items() if o == "text"} and "tok_embed.weight" in frozen
    assert "blocks.0.attn_norm.0.weight" not in frozen and "blocks.0.ffn.1.down.weight" not in frozen
    groups = param_groups(model, 0.1, {"image": 0.5})
    grouped = {id(p) for g in groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert grouped == {id(p) for n, p in params.items() if n not in frozen}
    assert {(g["owner"], g["weight_decay"], g["lr_mult"]) for g in groups} == {
        ("image", 0.1, 0.5), ("image", 0.0, 0.5), ("shared", 0.0, 1.0)}  # shared: norms only, no decay
    assert set(EMA(model, 0.9).shadow) == set(params) - set(frozen)
    assert freeze_parameters(model, []) == []
