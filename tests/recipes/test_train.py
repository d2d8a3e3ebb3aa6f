"""Composing a run (`tmot train`): the run directory it writes, and the rules for new and resumed runs."""

import json

import pytest
from helpers import make_config

from transfusion_mot.common import checkpoint as ckpt
from transfusion_mot.common.errors import ConfigError
from transfusion_mot.config import load_run_config
from transfusion_mot.recipes.train import train


def test_run_directory_contents(tmp_path, data):
    run = tmp_path / "run"
    cfg = make_config(data, train={"max_steps": 12, "tensorboard": True, "keep_checkpoints": 1,
                                   "save_every": 5})
    result = train(cfg, run)
    assert result.status == "completed" and result.step == 12
    assert load_run_config(run / "config.yaml") == cfg
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    for key in ("step", "loss", "text_loss", "image_loss", "lr", "tokens_per_s"):
        assert key in rows[0]
    assert all(abs(r["loss"] - (r["text_loss"] + 5 * r["image_loss"])) < 1e-4 for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["parameters"]["total"] > 0
    assert set(summary["parameters"]["per_modality"]) == {"text", "image"}
    assert summary["train_flops_per_token"]["image"] > 0
    # keep_checkpoints=1: only the last survives (periodic 5, 10 pruned)
    assert [s for s, _ in ckpt.list_checkpoints(run / "checkpoints")] == [12]
    files = {p.name for p in (run / "checkpoints/step_12").iterdir()}
    assert {"model.safetensors", "ema.safetensors", "optimizer.pt", "rank_0.pt", "state.json"} <= files
    # a fresh run in a directory with checkpoints must not silently overwrite it
    with pytest.raises(ConfigError, match="--resume"):
        train(cfg, run)


def test_resume_rejects_a_changed_recipe(tmp_path, data):
    run = tmp_path / "run"
    train(make_config(data, train={"max_steps": 3}), run)
    with pytest.raises(ConfigError, match="optim.lr"):
        train(make_config(data, ["optim.lr=0.1"]), run, resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(make_config(data), tmp_path / "empty", resume=True)


def test_the_run_directory_works_from_any_directory(tmp_path, data, monkeypatch):
    """Relative paths in a config are recorded absolute in RUN/config.yaml, so the run loads from elsewhere."""
    import shutil

    from transfusion_mot.run_dir import RunDir

    work = tmp_path / "work"
    shutil.copytree(data["latents"], work / "latents")
    monkeypatch.chdir(work)
    train(make_config({"latents": "latents"}, train={"max_steps": 2}, vae={"path": str(data["vae"])}), "run")
    saved = load_run_config(work / "run" / "config.yaml")
    assert saved.data.path == str(work / "latents") and saved.vae.path == str(data["vae"])
    monkeypatch.chdir(tmp_path)
    model, config, info = RunDir("work/run").load_model()
    assert info["step"] == 2
