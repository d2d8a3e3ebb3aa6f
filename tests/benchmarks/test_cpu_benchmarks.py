"""The CPU-path benchmarks run at toy size and report what BENCHMARKS.md quotes from them: the profile's parts
of a step and kinds of op (each a share of the step), MoT / dense step time side by side, the eager step with
the model's autograd functions against what they replaced, and compiled against eager sampling."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import cli_env

REPO = Path(__file__).resolve().parents[2]


def run(script: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], env=cli_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_profile_of_a_training_step_accounts_for_the_whole_step():
    report = run("profile_train_step.py", "--steps", "2", "--warmup", "1", "--images", "64", "--top", "3")
    assert report["batch"] == 64 and report["tokens_per_step"] > 0 and report["ops_per_step"] > 100
    # the rest of each table is the step less its other rows: non-negative only if no time is counted twice
    assert report["parts"]["rest of train_step"] >= 0 and report["kinds"]["dispatch and Python (no op)"] >= 0
    assert all(share >= 0 for table in ("parts", "kinds") for share in report[table].values())
    assert report["kinds"]["matmul"] > 0.05 and report["parts"]["backward"] > 0.1
    assert report["cpu"]["threads"] >= 1 and report["cpu"]["kernels"]


def test_mot_and_dense_step_side_by_side():
    report = run("peer_throughput.py", "--no-peer", "--steps", "2", "--warmup", "1", "--batch", "4")
    assert set(report["variants"]) == {"mot", "dense"}
    assert report["variants"]["mot"]["params"] > report["variants"]["dense"]["params"]
    assert 0.5 < report["mot_over_dense_step"] < 3.0


def test_eager_functions_against_what_they_replaced():
    """The script first checks that every variant gives the same loss and gradients (it fails otherwise)."""
    report = run("eager_functions.py", "--steps", "2", "--warmup", "1", "--batch", "4")
    assert set(report["variants"]) == {"mot", "dense"}
    for result in report["variants"].values():
        assert set(result["ms"]) == {"current", "composites", "recomputing norm", "both"}
        assert all(ms > 0 for ms in result["ms"].values())
        assert 0.2 < result["current_over_both"] < 5.0
    assert set(report["mot_over_dense"]) == set(report["variants"]["mot"]["ms"])


def test_compiled_and_eager_sampling_side_by_side():
    """Traced through AOTAutograd (no inductor C++ build here): two graphs over batches of new prompts, the eager
    latents, and the compile cost and break-even the README quotes."""
    report = run("sampling_compile.py", "--backend", "aot_eager", "--batch", "3", "--steps", "2", "--repeats", "2")
    assert report["compile"] == {"graphs": 2, "frames": 2, "graph_breaks": 0, "failed": 0}
    assert report["max_abs_latent_diff"] < 1e-4
    assert report["eager_s"] > 0 and report["compiled_s"] > 0 and report["first_compiled_batch_s"] > 0
    assert report["compiled_over_eager"] > 0 and report["compile_s"] == pytest.approx(
        report["first_compiled_batch_s"] - report["compiled_s"], abs=0.1)
    assert report["break_even_images"] is None or report["break_even_images"] > 0
    assert report["cpu"]["kernels"] and report["backend"] == "aot_eager"


def test_guidance_settings_are_scored_per_run_and_setting(tiny_run):
    """Toy size (a 6-step run, 2 sampler steps): every set scored for each setting, a bad setting refused."""
    report = run("guidance.py", "--run", str(tiny_run), "--settings", "3:0", "3:0.7", "--steps", "2")
    assert set(report["results"]) == {"3:0", "3:0.7"}
    for setting in report["results"].values():
        row = setting[str(tiny_run)]
        assert {"singles", "positioned", "pairs"} <= set(row)
        assert all(0.0 <= row[name][key] <= 1.0 for name in ("singles", "positioned", "pairs")
                   for key in ("colour", "shape", "all_correct"))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "guidance.py"), "--run", str(tiny_run),
                           "--settings", "5"], env=cli_env(), capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode != 0 and "CFG:RESCALE pairs" in proc.stderr.strip().splitlines()[-1]
