"""benchmarks/mot_vs_dense.py: variant switches, the ratios, and a toy end-to-end run (plot, table, JSON)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import config_dict, make_training_data

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("mot_vs_dense", REPO / "benchmarks" / "mot_vs_dense.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_variant_switches():
    assert bench.variant_overrides("dense") == ["model.untie=[]"]
    assert bench.variant_overrides("ffn") == ["model.untie=[ffn]"]
    assert bench.variant_overrides("ffn_attn") == ["model.untie=[ffn,attn]"]
    assert bench.variant_overrides("mot") == ["model.untie=[attn,ffn,norm]"]
    assert bench.variant_overrides("mot_causal") == ["model.untie=[attn,ffn,norm]", "model.image_attention=causal"]
    with pytest.raises(SystemExit, match="unknown variant"):
        bench.variant_overrides("moe")


def records(losses, time_per_step=1.0, every=10):
    return [{"step": (i + 1) * every, "train_time_s": (i + 1) * every * time_per_step, "val_image_loss": v,
             "val_text_loss": 1.0, "val_caption_loss": 0.5} for i, v in enumerate(losses)]


def summary(total, time_s):
    return {"parameters": {"total": total, "active_per_token": {"text": 1, "image": 1}},
            "model": {"untie": []}, "tokens_seen": 1000, "train_time_s": time_s}


def test_steps_and_time_ratios():
    runs = {"dense": records([0.5, 0.4, 0.3, 0.25]), "mot": records([0.45, 0.3, 0.2, 0.15], time_per_step=1.2)}
    result = bench.summarise(runs, {"dense": summary(10, 40.0), "mot": summary(20, 48.0)})
    # dense ends at 0.25; MoT first reaches <= 0.25 at step 30 of dense's 40 steps, at 36 s of dense's 40 s
    assert result["steps_ratio"] == 0.75 and result["time_ratio"] == 0.9
    assert result["mot_val_image_loss"] == 0.15 and result["dense_val_image_loss"] == 0.25
    assert result["variants"]["mot"]["reaches_dense_final_at_step"] == 30
    never = bench.summarise({"dense": records([0.3, 0.1]), "mot": records([0.3, 0.2])},
                            {"dense": summary(10, 20.0), "mot": summary(20, 20.0)})
    assert never["steps_ratio"] is None and never["time_ratio"] is None
    assert never["variants"]["mot"]["reaches_dense_final_at_step"] is None


def test_best_loss_and_overfitting_flag():
    # dense overfits (best 0.2 at step 20, final 0.3): MoT reaches dense's final loss early, and the table says
    # that the ratio is against a loss that rose again
    runs = {"dense": records([0.4, 0.2, 0.3]), "mot": records([0.35, 0.25, 0.28])}
    result = bench.summarise(runs, {"dense": summary(10, 30.0), "mot": summary(20, 30.0)})
    assert result["dense_best_val_image_loss"] == 0.2 and result["mot_best_val_image_loss"] == 0.25
    assert result["variants"]["dense"]["best_step"] == 20 and result["variants"]["mot"]["best_step"] == 20
    assert result["steps_ratio"] == 0.6667  # rounded to 4 places
    table = bench.render_table(result, "t")
    assert "| 0.3000 | 0.2000 (20) |" in table and "rises after its best for dense, mot" in table
    steady = bench.render_table(bench.summarise({"dense": records([0.4, 0.3]), "mot": records([0.4, 0.2])},
                                                {"dense": summary(1, 1.0), "mot": summary(1, 1.0)}), "t")
    assert "rises after its best" not in steady


def test_toy_end_to_end(tmp_path):
    d = make_training_data(tmp_path / "data")
    cfg = config_dict(d)
    cfg["model"]["max_seq_len"] = 96
    cfg["train"].update(log_every=1, batch_size=4)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "mot_vs_dense.py"), "--data", str(d["latents"]),
                           "--val-data", str(d["latents"]), "--config", str(tmp_path / "cfg.yaml"), "--steps", "4",
                           "--eval-every", "2", "--eval-samples", "6", "--bench-n", "0", "--threads", "1",
                           "--variants", "mot,dense,dense_causal", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("mot_val_image_loss", "dense_val_image_loss", "mot_val_text_loss", "dense_val_text_loss",
                "steps_ratio", "time_ratio"):
        assert key in last
    assert isinstance(last["mot_val_image_loss"], float) and isinstance(last["dense_val_text_loss"], float)
    assert (out / "curves.png").stat().st_size > 10_000
    table = (out / "results.md").read_text()
    assert "| mot | attn,ffn,norm |" in table and "| dense | - |" in table and "| dense_causal | - |" in table
    result = json.loads((out / "results.json").read_text())
    assert result["variants"]["mot"]["params"] > result["variants"]["dense"]["params"]
    assert result["variants"]["mot"]["active_per_token"] == result["variants"]["dense"]["active_per_token"]
    causal = yaml.safe_load((out / "runs" / "dense_causal" / "config.yaml").read_text())
    assert causal["model"]["image_attention"] == "causal" and causal["model"]["untie"] == []
    mot = yaml.safe_load((out / "runs" / "mot" / "config.yaml").read_text())
    assert mot["model"]["expert_init"] == "copy"  # the default: MoT starts as the dense model's function
    first = {name: [json.loads(line) for line in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()][0]
             for name in ("mot", "dense")}
    assert first["mot"]["step"] == 0 and first["mot"]["val_image_loss"] == pytest.approx(
        first["dense"]["val_image_loss"], rel=1e-5)
    steps = [json.loads(line)["step"] for line in (out / "runs" / "mot" / "metrics.jsonl").read_text().splitlines()
             if "val_image_loss" in json.loads(line)]
    assert steps == [0, 2, 4]


def test_means_and_spreads_over_seeds():
    per_seed = {}
    for seed, (mot, dense) in enumerate([([0.4, 0.2], [0.4, 0.3]), ([0.4, 0.3], [0.4, 0.3]), ([0.4, 0.4], [0.4, 0.3])]):
        per_seed[seed] = bench.summarise({"dense": records(dense), "mot": records(mot)},
                                         {"dense": summary(10, 20.0), "mot": summary(20, 20.0)})
    result = bench.over_seeds(per_seed)
    assert result["mot_val_image_loss"] == pytest.approx(0.3) and result["mot_val_image_loss_std"] == pytest.approx(0.1)
    assert result["dense_val_image_loss_std"] == 0.0
    # seed 2 never reaches dense's final loss: the ratio is averaged over the two seeds that did
    assert result["steps_ratio_per_seed"] == [1.0, 1.0, None] and result["steps_ratio"] == 1.0
    assert result["variants"]["mot"]["reaches_dense_final_at_step"] == [20, 20, None]
    table = bench.render_seed_table(result, "t")
    assert "mean ± sd over seeds 0, 1, 2" in table and "| mot | - | 20 | 0.3000 ± 0.1000 |" in table
    assert "| 20, 20, never |" in table
