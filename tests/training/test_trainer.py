"""The training loop: the recipe's schedule and EMA, exact resume, precision/accumulation/packing/sources,
checkpoints that survive failures, NaN handling, signals."""

import json
import multiprocessing
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from helpers import assert_workers_stop, cli_env, config_dict, kill_all, losses, make_config

from transfusion_mot.common import checkpoint as ckpt
from transfusion_mot.common.errors import TrainingError
from transfusion_mot.recipes.train import build_trainer, train

# -- the loop and its outputs ---------------------------------------------------------------------------


def test_lr_schedule_and_ema_are_the_recipe(tmp_path, data):
    from transfusion_mot.common.schedule import warmup_cosine

    run = tmp_path / "run"
    train(make_config(data, train={"max_steps": 6}), run)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == [warmup_cosine(s, 3e-3, 2, 40, 1e-4) for s in range(6)]
    raw = ckpt.load_tensors(run / "checkpoints/step_6/model.safetensors")
    ema = ckpt.load_tensors(run / "checkpoints/step_6/ema.safetensors")
    assert raw.keys() == ema.keys()
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)


def test_resume_gives_identical_losses(tmp_path, data):
    """20 steps, then --resume to 40 == 40 steps uninterrupted, step for step (CPU, deterministic)."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    cfg = make_config(data, data={"image_first_ratio": 0.3, "caption_dropout": 0.2})
    train(cfg, straight)
    first = make_config(data, data={"image_first_ratio": 0.3, "caption_dropout": 0.2}, train={"max_steps": 20})
    train(first, split)
    assert max(losses(split)) == 20
    train(make_config(data, data={"image_first_ratio": 0.3, "caption_dropout": 0.2}), split, resume=True)
    a, b = losses(straight), losses(split)
    assert sorted(a) == sorted(b) == list(range(1, 41))
    assert a == b
    wa = ckpt.load_tensors(straight / "checkpoints/step_40/ema.safetensors")
    wb = ckpt.load_tensors(split / "checkpoints/step_40/ema.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_passes_over_a_damaged_newest_checkpoint(tmp_path, data, capsys):
    """A newest checkpoint cut short (a full disk): --resume names it, resumes from the one before, and the
    run still ends with the losses of one that never stopped."""
    straight, run = tmp_path / "straight", tmp_path / "run"
    train(make_config(data, train={"max_steps": 20}), straight)
    train(make_config(data, train={"max_steps": 20, "keep_checkpoints": 0}), run)
    optimizer = run / "checkpoints/step_20/optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:1000])
    capsys.readouterr()
    train(make_config(data, train={"max_steps": 20, "keep_checkpoints": 0}), run, resume=True)
    err = capsys.readouterr().err
    assert "warning: damaged checkpoint" in err and "step_20: optimizer.pt has 1000 bytes" in err
    assert losses(run) == losses(straight)  # steps 11-20 were run again, exactly
    ckpt.verify_checkpoint(run / "checkpoints/step_20")  # and the damaged checkpoint was replaced


def test_bf16_grad_accum_packing_text_only_and_folder_source(tmp_path, data):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox\n\njumps over the lazy dog\nhello world\n")
    cfg = make_config(data, data={"packing": True, "token_budget": 96, "text_only_path": str(corpus),
                                  "text_only_ratio": 0.25},
                      train={"max_steps": 4, "precision": "bf16", "grad_accum": 2})
    result = train(cfg, tmp_path / "run")
    assert result.summary["data_mix"]["text_only"] > 0
    assert all(torch.isfinite(torch.tensor(v)).all() for v in losses(tmp_path / "run").values())
    # images encoded on the fly by the VAE give the same latents as the cache: same losses
    on_the_fly = make_config(data, data={"kind": "folder", "path": str(data["folder"])}, vae={"path": str(data["vae"])},
                             train={"max_steps": 3})
    cached = make_config(data, train={"max_steps": 3})
    train(on_the_fly, tmp_path / "folder")
    train(cached, tmp_path / "cached")
    la, lb = losses(tmp_path / "folder"), losses(tmp_path / "cached")
    assert la.keys() == lb.keys()
    for step in la:
        assert la[step] == pytest.approx(lb[step], rel=1e-4, abs=1e-5)


def test_the_data_workers_stop_when_the_run_ends(tmp_path, data):
    """Images decoded by worker processes: they are gone when `fit` returns, while the trainer and its data
    are still referenced, so only `fit` can have stopped them."""
    before = set(multiprocessing.active_children())
    cfg = make_config(data, data={"kind": "folder", "path": str(data["folder"]), "num_workers": 2},
                      vae={"path": str(data["vae"])}, train={"max_steps": 2})
    trainer = build_trainer(cfg, tmp_path / "run")
    next(trainer.data.mix.pairs.source)  # the workers start with the first item
    assert_workers_stop(before, 2, trainer.fit)


def test_metrics_report_mfu_and_padding_of_the_batches_trained_on(tmp_path, data):
    """mfu x peak / tokens_per_s is the FLOPs per token of the step's packed rows and padding_fraction their
    share of padding, both recomputed here from the same batches (the stream does not depend on weights)."""
    from transfusion_mot.accounting import batch_train_flops
    from transfusion_mot.recipes.train import build_trainer

    sections = dict(data={"packing": True, "token_budget": 64}, train={"max_steps": 3, "batch_size": 2,
                                                                        "peak_tflops": 0.5})
    train(make_config(data, **sections), tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    replay = build_trainer(make_config(data, **sections), tmp_path / "replay")
    for row in rows:
        batch = next(replay.data.batches).inputs
        assert tuple(batch.tokens.shape) == (2, 64)
        real = batch.doc_ids >= 0
        flops = batch_train_flops(replay.accounting, batch.modality, batch.doc_ids, replay.config.model.modalities)
        assert row["padding_fraction"] == pytest.approx(1 - float(real.float().mean()))
        assert row["mfu"] * 0.5e12 / row["tokens_per_s"] == pytest.approx(flops / int(real.sum()), rel=1e-9)


def test_activation_checkpointing_gives_the_same_losses(tmp_path, data):
    plain = make_config(data, train={"max_steps": 3})
    checkpointed = make_config(data, train={"max_steps": 3, "activation_checkpointing": True})
    train(plain, tmp_path / "a")
    train(checkpointed, tmp_path / "b")
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert la.keys() == lb.keys()
    for step in la:
        assert la[step] == pytest.approx(lb[step], rel=1e-5)
    a = ckpt.load_tensors(tmp_path / "a/checkpoints/step_3/model.safetensors")
    b = ckpt.load_tensors(tmp_path / "b/checkpoints/step_3/model.safetensors")
    assert a.keys() == b.keys()  # no wrapper prefixes in saved names


# -- faults ---------------------------------------------------------------------------------------------


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, data, monkeypatch, capsys):
    run = tmp_path / "run"
    real_save = ckpt.save_tensors
    calls = {"n": 0}

    def flaky(tensors, path, metadata=None):
        if "step_20" in str(path):
            calls["n"] += 1
            real_save(tensors, path, metadata)  # a partial write, then the disk is full
            raise OSError(28, "No space left on device")
        real_save(tensors, path, metadata)

    monkeypatch.setattr(ckpt, "save_tensors", flaky)
    cfg = make_config(data, train={"max_steps": 20, "keep_checkpoints": 1})
    with pytest.raises(TrainingError, match="step 20.*step_10 is intact|step_10"):
        train(cfg, run)
    assert calls["n"] == 1
    assert "No space left" in capsys.readouterr().err
    # step 10 is whole and still the latest; no staging directory is left behind
    assert [s for s, _ in ckpt.list_checkpoints(run / "checkpoints")] == [10]
    before = ckpt.load_tensors(run / "checkpoints/step_10/model.safetensors")
    assert not list((run / "checkpoints").glob(".tmp-*"))
    # a periodic failure is a warning: training goes on and later saves succeed
    monkeypatch.setattr(ckpt, "save_tensors", real_save)
    calls2 = {"n": 0}

    def fail_once(tensors, path, metadata=None):
        if "step_20" in str(path) and calls2["n"] == 0:
            calls2["n"] += 1
            raise PermissionError(13, "Permission denied")
        real_save(tensors, path, metadata)

    monkeypatch.setattr(ckpt, "save_tensors", fail_once)
    result = train(make_config(data, train={"max_steps": 30, "keep_checkpoints": 0}), run, resume=True)
    assert result.status == "completed" and result.summary["failed_saves"] == 1
    assert [s for s, _ in ckpt.list_checkpoints(run / "checkpoints")] == [10, 30]
    after = ckpt.load_tensors(run / "checkpoints/step_10/model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path, data, monkeypatch):
    import transfusion_mot.losses as losses_module

    real_loss = losses_module.transfusion_loss
    calls = {"n": 0}
    poisoned = {4, 5} | set(range(12, 40))  # two isolated bad steps, then a run of them

    def loss_fn(*args, **kwargs):
        calls["n"] += 1
        out = real_loss(*args, **kwargs)
        if calls["n"] in poisoned:
            out = dict(out)
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(losses_module, "transfusion_loss", loss_fn)
    run = tmp_path / "run"
    cfg = make_config(data, optim={"ema_decay": 0.9}, train={"max_steps": 40, "max_bad_steps": 5, "save_every": 10})
    with pytest.raises(TrainingError, match="5 consecutive steps.*step_10"):
        train(cfg, run)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[3]["skipped_steps"] == 1 and rows[4]["skipped_steps"] == 2 and rows[5]["skipped_steps"] == 2
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["skipped_steps"] == 7
    weights = ckpt.load_tensors(run / "checkpoints/step_10/model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert [s for s, _ in ckpt.list_checkpoints(run / "checkpoints")] == [10]


def test_sigterm_saves_and_exits_cleanly(tmp_path, data):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(config_dict(data, train={"max_steps": 100000, "save_every": 100000})))
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "transfusion_mot", "train", "--config", str(cfg), "--out", str(run)],
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        metrics = run / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "stopped on request" in out and "--resume" in out
    steps = [s for s, _ in ckpt.list_checkpoints(run / "checkpoints")]
    assert len(steps) == 1 and steps[0] >= 3
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["step"] == steps[0]
    # and it resumes from there
    result = train(make_config(data, train={"max_steps": steps[0] + 2, "save_every": 100000}), run, resume=True)
    assert result.step == steps[0] + 2




@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_sigkill_at_random_moments_resumes_bit_exactly(tmp_path, data, nproc):
    """SIGKILL (no chance to save) at five or more random moments, many inside a checkpoint save
    (save_every 1), each followed by --resume: the losses at every step and the final weights equal an
    uninterrupted run's (one process, and two with FSDP2 and sharded checkpoints)."""
    import random

    from transfusion_mot.run_dir import RunDir

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(config_dict(data, train={"max_steps": 40, "save_every": 1, "keep_checkpoints": 2})))
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
              if nproc == 2 else [sys.executable, "-m"]) + ["transfusion_mot", "train", "--no-progress"]
    straight, run = tmp_path / "straight", tmp_path / "run"
    start = time.perf_counter()
    proc = subprocess.run(launch + ["--config", str(cfg), "--out", str(straight)], env=cli_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    whole_run = time.perf_counter() - start  # kills land within it, however fast this machine trains
    rng = random.Random(nproc)
    kills = 0
    for attempt in range(40):
        started = (run / "checkpoints").is_dir() and any((run / "checkpoints").glob("step_*"))
        args = ["--out", str(run), "--resume"] if started else ["--config", str(cfg), "--out", str(run)]
        child = subprocess.Popen(launch + args, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 text=True, start_new_session=True)
        if kills < 5:
            try:
                child.wait(timeout=rng.uniform(0.3, 0.8) * whole_run)
            except subprocess.TimeoutExpired:
                kill_all(child.pid)  # torchrun and its workers, at once
                child.wait()
                kills += 1
                continue
        _, err = child.communicate(timeout=600)
        assert child.returncode == 0, err[-3000:]
        if kills >= 5:
            break
    assert kills >= 5
    assert losses(run) == losses(straight)
    for ema in (True, False):
        a, _, _ = RunDir(straight).load_model(ema=ema)
        b, _, _ = RunDir(run).load_model(ema=ema)
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
