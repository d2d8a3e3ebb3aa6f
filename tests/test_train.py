"""tmot train: configs, exact resume, checkpoints that survive failures, NaN handling, signals, FSDP2."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from transfusion_mot.cli import main
from transfusion_mot.common import checkpoint as ckpt
from transfusion_mot.common.errors import ConfigError, TrainingError
from transfusion_mot.recipes.train import train
from transfusion_mot.run import load_run_config, load_run_model, run_config_from_dict, save_run_config

REPO = Path(__file__).resolve().parents[1]


def make_folder(root: Path, n: int, size: int = 16) -> Path:
    root.mkdir(parents=True)
    rows = []
    colours = ["red", "green", "blue", "yellow"]
    for i in range(n):
        c = colours[i % 4]
        rgb = {"red": (230, 30, 30), "green": (30, 190, 60), "blue": (40, 90, 245), "yellow": (250, 225, 30)}[c]
        im = Image.new("RGB", (size, size), (40, 40, 40))
        im.paste(rgb, (i % 6, i % 5, i % 6 + 8, i % 5 + 8))
        im.save(root / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"a {c} square", "split": "train"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def make_training_data(root: Path) -> dict[str, Path]:
    """(image folder, VAE dir, latent cache) with 24 images of 16 px -> 8x8x4 latents."""
    from vae import VAEConfig, build_vae, encode_folder, set_latent_stats

    folder = make_folder(root / "images", 24)
    torch.manual_seed(0)
    vae = build_vae(VAEConfig(block_out_channels=[8, 16], norm_num_groups=8, sample_size=16))
    set_latent_stats(vae, shift_factor=0.0, scaling_factor=1.0)
    vae.save_pretrained(root / "vae")
    encode_folder(root / "vae", folder, root / "latents", batch_size=8, progress=False)
    return {"folder": folder, "vae": root / "vae", "latents": root / "latents"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_training_data(tmp_path_factory.mktemp("traindata"))


def config_dict(d, **sections):
    base = {
        "model": {"dim": 32, "n_layers": 2, "n_heads": 2, "ffn_dim": 64, "vocab_size": 261, "latent_channels": 4,
                  "patch_size": 2, "max_seq_len": 96},
        "tokenizer": {"kind": "bytes"},
        "vae": {},
        "data": {"kind": "latents", "path": str(d["latents"])},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "min_lr": 1e-4, "ema_decay": 0.9, "decay_steps": 40},
        "train": {"max_steps": 40, "batch_size": 4, "log_every": 1, "save_every": 10, "keep_checkpoints": 0,
                  "progress": False, "tensorboard": False, "device": "cpu"},
    }
    for name, values in sections.items():
        base[name].update(values)
    return base


def make_config(d, overrides=(), **sections):
    return run_config_from_dict(config_dict(d, **sections), list(overrides))


def losses(run: Path) -> dict[int, tuple[float, float, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["text_loss"], r["image_loss"]) for r in rows}


# -- configs -------------------------------------------------------------------------------------------


def test_shipped_train_configs_load():
    for name in ("shapes-tiny", "emoji-tiny", "coco-760m"):
        cfg = load_run_config(REPO / "configs" / "train" / f"{name}.yaml")
        assert cfg.optim.betas == [0.9, 0.95]
    coco = load_run_config(REPO / "configs/train/coco-760m.yaml")
    assert coco.model.dim == 1536 and coco.model.latent_channels == 4  # base file + in-file change
    assert coco.data.kind == "webdataset" and coco.data.packing
    tiny = load_run_config(REPO / "configs/train/shapes-tiny.yaml", ["model.untie=[]", "optim.lr=0.01"])
    assert tiny.model.untie == [] and tiny.optim.lr == 0.01 and tiny.model.dim == 128


def test_unknown_keys_name_their_path(tmp_path, data):
    with pytest.raises(ConfigError, match=r"'train\.max_stpes'"):
        make_config(data, ["train.max_stpes=3"])
    with pytest.raises(ConfigError, match=r"'model\.dimm'"):
        make_config(data, ["model.dimm=3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**config_dict(data), "optimizer": {"lr": 1}}))
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown config key 'optimizer'"):
        load_run_config(bad)


def test_cli_config_error_is_one_line(tmp_path, data, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(config_dict(data)))
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run"), "--set", "optim.bogus=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "optim.bogus" in err


def test_resolved_config_round_trips(tmp_path, data):
    cfg = make_config(data, ["train.seed=3"])
    save_run_config(cfg, tmp_path / "config.yaml")
    assert load_run_config(tmp_path / "config.yaml") == cfg


# -- the loop and its outputs ---------------------------------------------------------------------------


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


def test_resume_rejects_a_changed_recipe(tmp_path, data):
    run = tmp_path / "run"
    train(make_config(data, train={"max_steps": 3}), run)
    with pytest.raises(ConfigError, match="optim.lr"):
        train(make_config(data, ["optim.lr=0.1"]), run, resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(make_config(data), tmp_path / "empty", resume=True)


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
    import transfusion_mot.training.trainer as train_mod

    real_loss = train_mod.transfusion_loss
    calls = {"n": 0}
    poisoned = {4, 5} | set(range(12, 40))  # two isolated bad steps, then a run of them

    def loss_fn(*args, **kwargs):
        calls["n"] += 1
        out = real_loss(*args, **kwargs)
        if calls["n"] in poisoned:
            out = dict(out)
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(train_mod, "transfusion_loss", loss_fn)
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


def _cli_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def test_sigterm_saves_and_exits_cleanly(tmp_path, data):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(config_dict(data, train={"max_steps": 100000, "save_every": 100000})))
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "transfusion_mot", "train", "--config", str(cfg), "--out", str(run)],
                            env=_cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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


# -- multi-process --------------------------------------------------------------------------------------


def test_two_process_fsdp2_run_loads_in_one_process(tmp_path, data):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(config_dict(data, train={"max_steps": 4, "save_every": 2, "precision": "bf16"})))
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "transfusion_mot", "train", "--config", str(cfg), "--out", str(run)]
    proc = subprocess.run(cmd, env=_cli_env(), capture_output=True, text=True, timeout=300)
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
        proc = subprocess.run(launch + args, env=_cli_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(tmp_path / "straight") == losses(tmp_path / "split")


def test_precision_auto_is_bf16_only_where_native(monkeypatch):
    from transfusion_mot.run import resolve_precision

    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    for caps, expected in (({"avx512_bf16": False, "amx_bf16": False}, "fp32"), ({"avx512_bf16": True}, "bf16"),
                           ({"amx_bf16": True}, "bf16")):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda caps=caps: caps)
        assert resolve_precision("auto", cpu) == expected
    with pytest.raises(ConfigError, match="precision must be one of"):
        run_config_from_dict({"train": {"precision": "fp16"}})
