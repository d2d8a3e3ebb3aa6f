"""A run's checkpoint parts: weights saved under the plain model's names whatever wraps the blocks, the
optimizer keyed by parameter name, and counters that refuse a checkpoint of another world size."""

import pytest
import torch
from helpers import tiny_config

from transfusion_mot.common.errors import TrainingError
from transfusion_mot.model import TransfusionMoT
from transfusion_mot.training.optim import EMA
from transfusion_mot.training.parallel import apply_activation_checkpointing
from transfusion_mot.training.state import ModelWeights, OptimizerState, RunProgress, clean_key


def test_weights_keep_the_plain_names_through_wrappers():
    torch.manual_seed(0)
    plain = TransfusionMoT(tiny_config())
    wrapped = TransfusionMoT(tiny_config())
    apply_activation_checkpointing(wrapped)
    assert any("_checkpoint_wrapped_module" in n for n, _ in wrapped.named_parameters())
    state = ModelWeights(wrapped).state_dict()
    assert set(state) == {n for n, _ in plain.named_parameters()}
    ModelWeights(plain).load_state_dict(state)
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in state.items())
    assert clean_key("blocks.0._checkpoint_wrapped_module._orig_mod.ffn.0.down.weight") == "blocks.0.ffn.0.down.weight"
    with pytest.raises(TrainingError, match="model weights: checkpoint lacks"):
        ModelWeights(plain).load_state_dict({k: v for k, v in state.items() if "lm_head" not in k})


def test_ema_and_optimizer_round_trip():
    torch.manual_seed(0)
    model = TransfusionMoT(tiny_config())
    ema = EMA(model, 0.9)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    ema.update(model)
    other = TransfusionMoT(tiny_config())
    other_ema, other_opt = EMA(other, 0.9), torch.optim.AdamW(other.parameters(), lr=1e-2)
    other_ema.load_state_dict(ema.state_dict())
    OptimizerState(other, other_opt).load_state_dict(OptimizerState(model, opt).state_dict())
    assert all(torch.equal(other_ema.shadow[k], v) for k, v in ema.shadow.items())
    a, b = opt.state_dict()["state"], other_opt.state_dict()["state"]
    assert all(torch.equal(a[i]["exp_avg"], b[i]["exp_avg"]) for i in a)
    assert set(OptimizerState(model, opt).state_dict()["state"]) == {n for n, _ in model.named_parameters()}


def test_progress_counters_and_world_size():
    progress = RunProgress(world_size=2, vae="v", clock=lambda: 123.0)
    progress.skipped_steps, progress.tokens_seen, progress.train_time = 3, 1000, 4.5
    state = {"step": 40, **progress.state_dict()}
    assert state == {"step": 40, "world_size": 2, "skipped_steps": 3, "bad_in_a_row": 0, "tokens_seen": 1000,
                     "time": 123.0, "train_time_s": 4.5, "vae": "v"}
    again = RunProgress(world_size=2, vae="v")
    again.load_state_dict(state)
    assert (again.step, again.skipped_steps, again.tokens_seen, again.train_time) == (40, 3, 1000, 4.5)
    with pytest.raises(TrainingError, match="written by 2 processes; resume with the same number \\(got 1\\)"):
        RunProgress(world_size=1, vae="v").load_state_dict(state)
