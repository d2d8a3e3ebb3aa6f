"""The run directory and its checkpoint format: where a run keeps what, beginning and resuming a run, loading
its model for inference, and the checkpoint parts (weights under the plain model's names whatever wraps the
blocks, the optimizer keyed by parameter name, counters, and the sharded DCP layout: written by an FSDP2
model, read back by a plain one, consolidated in one process, and named when damaged)."""

import pytest
import torch
from helpers import make_config, tiny_config

from transfusion_mot.common.checkpoint import ModuleWeights
from transfusion_mot.common.distributed import DistInfo
from transfusion_mot.common.errors import ConfigError, InputNotFound, InvalidInput, TrainingError
from transfusion_mot.common.tensors import clean_key
from transfusion_mot.model import TransfusionMoT
from transfusion_mot.run_dir import (
    OptimizerState,
    RunDir,
    RunProgress,
    ShardedWeights,
    load_inference_weights,
    read_sharded,
    sharded_keys,
)
from transfusion_mot.training.optim import EMA
from transfusion_mot.training.parallel import apply_activation_checkpointing


def test_every_path_of_a_run_comes_from_the_run_directory(tmp_path):
    run = RunDir(tmp_path / "r")
    assert [p.name for p in (run.config_file, run.metrics_file, run.summary_file, run.evaluation_file,
                             run.tokenizer_file, run.tensorboard_dir, run.lm_dir, run.checkpoints_dir)] == [
        "config.yaml", "metrics.jsonl", "summary.json", "evaluation.json", "tokenizer.json", "tensorboard",
        "text_lm", "checkpoints"]  # the documented layout (README, "what a run directory holds")
    assert not run.exists() and run.read_summary() == {} and run.read_evaluation() == {}
    with pytest.raises(InputNotFound, match="no config.yaml"):
        run.load_config()
    with pytest.raises(InputNotFound, match="no metrics.jsonl"):
        run.read_metrics()
    run.path.mkdir()
    run.write_summary({"step": 3})
    assert run.read_summary() == {"step": 3}


def test_begin_writes_the_config_and_resume_checks_it(tmp_path, data):
    run = RunDir(tmp_path / "r")
    config = make_config(data)
    assert run.begin(config, resume=False, dist=DistInfo()) is None
    assert run.load_config() == config
    with pytest.raises(InputNotFound, match="no checkpoint .* to resume from"):
        run.begin(config, resume=True, dist=DistInfo())
    (run.checkpoints_dir / "step_2").mkdir(parents=True)
    (run.checkpoints_dir / "step_2" / "state.json").write_text('{"step": 2, "files": {}}')
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        run.begin(config, resume=False, dist=DistInfo())
    assert run.begin(make_config(data, ["train.max_steps=99"]), resume=True, dist=DistInfo()).name == "step_2"
    with pytest.raises(ConfigError, match=r"differs from the run's config.yaml in \['optim.lr'\]"):
        run.begin(make_config(data, ["optim.lr=0.5"]), resume=True, dist=DistInfo())


def test_load_model_names_a_checkpoint_of_another_model(tiny_run, tmp_path):
    model, config, info = RunDir(tiny_run).load_model()
    assert info["step"] == 6 and info["weights"] == "ema.safetensors" and info["vae"]
    raw, _, raw_info = RunDir(tiny_run).load_model(ema=False)
    assert raw_info["weights"] == "model.safetensors"
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), raw.parameters()))
    import shutil

    other = tmp_path / "other"
    shutil.copytree(tiny_run, other)
    text = (other / "config.yaml").read_text().replace("ffn_dim: 64", "ffn_dim: 48")
    (other / "config.yaml").write_text(text)
    with pytest.raises(InvalidInput, match="has shape .* but the run's model config makes it"):
        RunDir(other).load_model()


def test_weights_keep_the_plain_names_through_wrappers():
    torch.manual_seed(0)
    plain = TransfusionMoT(tiny_config())
    wrapped = TransfusionMoT(tiny_config())
    apply_activation_checkpointing(wrapped)
    assert any("_checkpoint_wrapped_module" in n for n, _ in wrapped.named_parameters())
    state = ModuleWeights(wrapped).state_dict()
    assert set(state) == {n for n, _ in plain.named_parameters()}
    ModuleWeights(plain).load_state_dict(state)
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in state.items())
    assert clean_key("blocks.0._checkpoint_wrapped_module._orig_mod.ffn.0.down.weight") == "blocks.0.ffn.0.down.weight"
    with pytest.raises(TrainingError, match="model weights: checkpoint lacks"):
        ModuleWeights(plain).load_state_dict({k: v for k, v in state.items() if "lm_head" not in k})
    with pytest.raises(TrainingError, match="model weights: checkpoint holds 1 tensors this model does not have"):
        ModuleWeights(plain).load_state_dict({**state, "extra.weight": torch.zeros(1)})


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
    unsharded model, optimizer and EMA exactly, and is consolidated in one process for inference."""
    from helpers import process_group
    from torch.distributed.fsdp import fully_shard

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
    assert sharded_keys(checkpoint, "ema") == set(expected_ema) and sharded_keys(checkpoint, "optimizer")
    weights, source = load_inference_weights(checkpoint, shapes)
    assert source == "dcp/ema" and all(torch.equal(weights[k], expected_ema[k]) for k in expected_ema)
    weights, source = load_inference_weights(checkpoint, shapes, ema=False)
    assert source == "dcp/model" and all(torch.equal(weights[k], expected[k]) for k in expected)
    # a damaged shard names the checkpoint
    shard = next((checkpoint / "dcp").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(TrainingError, match="damaged checkpoint .*step_2: cannot read dcp/"):
        read_sharded(checkpoint, shapes, "model")
