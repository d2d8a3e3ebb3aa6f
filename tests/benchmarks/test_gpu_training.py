"""The GPU benchmark script runs end to end (its --smoke mode: a tiny model on the CPU) and reports every
field its JSON line promises, with FLOPs that equal the accounting's for the same rows."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_smoke_run_prints_the_report():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/gpu_training.py"), "--smoke"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    training = report["training"]
    mot, dense = training["163m-mot-eager-sdpa"], training["163m-dense-eager-sdpa"]
    for row in (mot, dense):
        assert row["tokens_per_s"] > 0 and row["mfu"] is None  # no peak on a CPU
        assert 0 < row["tokens_per_step"] <= 256
    assert mot["params"] > dense["params"]
    # one expert per token: MoT and dense do the same training FLOPs per token
    assert mot["train_flops_per_step"] == dense["train_flops_per_step"]
    assert training["163m-eager-sdpa-mot_over_dense_step_time"] > 0
    assert set(report["sampling"]) >= {"2_steps_kv_cache", "2_steps_no_cache", "2_steps_kv_cache_speedup"}
