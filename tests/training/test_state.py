"""A run's checkpoint parts: weights saved under the plain model's names whatever wraps the blocks, the
optimizer keyed by parameter name, counters, and the sharded (DCP) format: written by an FSDP2 model,
read back by a plain one, consolidated in one process, and named when damaged."""

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
    other_world = RunProgress(world_size=1, vae="v")  # another process count resumes too (re-split data)
    other_world.load_state_dict(state)
    assert (other_world.step, other_world.world_size) == (40, 1)


def _trained(model, steps=2):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ema = EMA(model, 0.5)
    for _ in range(steps):
        loss = sum(p.float().pow(2).sum() for p in model.parameters())
        loss.backward()
        opt.step()
        opt.zero_grad()
        ema.update(model)
    return opt, ema


def test_sharded_checkpoint_written_under_fsdp2_loads_into_a_plain_model(tmp_path):
    """ShardedWeights (DCP) from an FSDP2-wrapped model (a real gloo group of one process) loads into an
    unsharded model, optimizer and EMA exactly, and `read_sharded_weights` consolidates it in one process."""
    from helpers import process_group
    from torch.distributed.fsdp import fully_shard

    from transfusion_mot.common.checkpoint import read_sharded_weights, sharded_has
    from transfusion_mot.training.state import ShardedWeights

    torch.manual_seed(0)
    config = tiny_config()
    checkpoint = tmp_path / "step_2"
    with process_group(0, 1, tmp_path):
        sharded = TransfusionMoT(config)
        for block in sharded.blocks:
            fully_shard(block)
        fully_shard(sharded)
        opt, ema = _trained(sharded)
        ShardedWeights(sharded, opt, ema).save_to(checkpoint / "dcp")
        expected = {n: p.full_tensor().clone() for n, p in sharded.named_parameters()}
        expected_ema = {n: t.full_tensor().clone() for n, t in ema.shadow.items()}
        expected_avg = {n: opt.state[p]["exp_avg"].full_tensor().clone() for n, p in sharded.named_parameters()}
    plain = TransfusionMoT(config)
    plain_opt, plain_ema = torch.optim.AdamW(plain.parameters(), lr=1e-2), EMA(plain, 0.5)
    ShardedWeights(plain, plain_opt, plain_ema).load_from(checkpoint / "dcp")
    for name, p in plain.named_parameters():
        assert torch.equal(p.detach(), expected[name]), name
        assert torch.equal(plain_ema.shadow[name], expected_ema[name]), name
        assert torch.equal(plain_opt.state[p]["exp_avg"], expected_avg[name]), name
    shapes = {k: v.shape for k, v in plain.state_dict().items()}
    assert sharded_has(checkpoint, "ema") and sharded_has(checkpoint, "optimizer")
    consolidated = read_sharded_weights(checkpoint, shapes, "ema")
    assert all(torch.equal(consolidated[k], expected_ema[k]) for k in expected_ema)
    # a damaged shard names the checkpoint
    shard = next((checkpoint / "dcp").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(TrainingError, match="damaged checkpoint .*step_2: cannot read dcp/"):
        read_sharded_weights(checkpoint, shapes, "model")
