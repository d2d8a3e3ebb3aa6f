"""FSDP2 applied from outside the model: a 2-process (torchrun, gloo) run that one process loads, and exact resume."""

import json
import subprocess
import sys

import pytest
import torch
import yaml
from helpers import cli_env, config_dict, losses

from transfusion_mot.common import checkpoint as ckpt
from transfusion_mot.run import load_run_model


def test_two_process_fsdp2_run_loads_in_one_process(tmp_path, data):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(config_dict(data, train={"max_steps": 4, "save_every": 2, "precision": "bf16"})))
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "transfusion_mot", "train", "--config", str(cfg), "--out", str(run)]
    proc = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    checkpoint = run / "checkpoints/step_4"
    assert {"rank_0.pt", "rank_1.pt", "model.safetensors", "optimizer.pt"} <= {p.name for p in checkpoint.iterdir()}
    assert json.loads((checkpoint / "state.json").read_text())["world_size"] == 2
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # one process loads the full (unsharded) weights, raw and EMA, and runs the model
    model, config, info = load_run_model(run, ema=False)
    assert info["step"] == 4 and info["weights"] == "model.safetensors"
    full = ckpt.load_tensors(checkpoint / "model.safetensors")
    assert set(full) == set(model.state_dict())
    for name, tensor in model.state_dict().items():
        assert tensor.shape == full[name].shape
    ema_model, _, ema_info = load_run_model(run)
    assert ema_info["weights"] == "ema.safetensors"
    # the weights moved away from the seed's initialisation on every rank's shard
    torch.manual_seed(config.train.seed)
    from transfusion_mot.model import TransfusionMoT

    init = TransfusionMoT(config.model).state_dict()
    big = [k for k in init if init[k].dim() == 2 and init[k].shape[0] >= 2]
    for k in big:
        half = init[k].shape[0] // 2
        assert not torch.equal(init[k][:half], full[k][:half]) and not torch.equal(init[k][half:], full[k][half:]), k


@pytest.mark.slow
def test_two_process_resume_is_exact(tmp_path, data):
    """FSDP2 on 2 processes: 3 steps + --resume to 6 == 6 steps straight (bf16, gloo)."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(config_dict(data, train={"max_steps": 6, "save_every": 3, "precision": "bf16"})))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "-m", "transfusion_mot", "train"]
    for args in (["--config", str(cfg), "--out", str(tmp_path / "straight")],
                 ["--config", str(cfg), "--out", str(tmp_path / "split"), "--max-steps", "3"],
                 ["--out", str(tmp_path / "split"), "--resume", "--max-steps", "6"]):
        proc = subprocess.run(launch + args, env=cli_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(tmp_path / "straight") == losses(tmp_path / "split")
