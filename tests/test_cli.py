"""The command line: help texts, one-line errors with non-zero exit, and the demo's outputs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import config_dict

from transfusion_mot.cli import main

ROOT = Path(__file__).resolve().parents[1]


def tmot(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "transfusion_mot", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


@pytest.mark.parametrize("command", [[], ["demo"], ["info"], ["data"], ["data", "shapes"], ["data", "emoji"],
                                     ["data", "folder"], ["data", "tokenizer"], ["vae"], ["vae", "train"],
                                     ["vae", "encode"], ["vae", "reconstruct"]])
def test_help(command):
    r = tmot(*command, "--help")
    assert r.returncode == 0
    assert "example" in r.stdout


@pytest.mark.parametrize("args,match", [
    (["data", "shapes", "--out", "x", "--num", "0"], "expected a positive integer"),
    (["data", "shapes", "--out", "x", "--val-fraction", "2"], "expected a number in [0, 1)"),
    (["demo", "--steps", "-3"], "expected a positive integer"),
    (["nonsense"], "invalid choice"),
    (["data", "folder", "--src", "/does/not/exist", "--out", "x"], "source directory not found"),
])
def test_bad_arguments_are_one_line_errors(args, match, tmp_path):
    r = tmot(*args, cwd=tmp_path)
    assert r.returncode == 2
    assert match in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_unknown_config_key_is_one_line_error(tmp_path):
    cfg = tmp_path / "m.yaml"
    cfg.write_text("dim: 64\nn_heads: 4\nwidth: 3\n")
    r = tmot("info", "--config", str(cfg))
    assert r.returncode == 2
    assert "unknown config key 'width'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_missing_config_file(tmp_path):
    r = tmot("info", "--config", str(tmp_path / "none.yaml"))
    assert r.returncode == 2 and "not found" in r.stderr and "Traceback" not in r.stderr


def test_info_accounts_the_7b_config():
    r = tmot("info", "--config", "configs/model/7b.yaml", "--set", "untie=[]", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert 6.4e9 < info["total_params"] < 7.2e9
    assert info["shared_params"] > 0.9 * info["total_params"]


def test_cli_config_error_is_one_line(tmp_path, data, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(config_dict(data)))
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run"), "--set", "optim.bogus=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "optim.bogus" in err


def test_an_internal_error_keeps_its_traceback(monkeypatch):
    """Only the project's UserError becomes a one-line message; a bug inside a command propagates."""
    import transfusion_mot.cli as cli

    def broken(args):
        raise ValueError("a defect, not a user mistake")

    monkeypatch.setattr(cli, "cmd_info", broken)
    with pytest.raises(ValueError, match="a defect"):
        cli.main(["info", "--config", "tiny"])


def test_shipped_configs_by_name(capsys):
    assert main(["info", "--config", "tiny", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total_params"] > 0
    assert main(["info", "--config", "huge"]) == 2
    assert "shipped model config: 1.4b, 163m, 760m, 7b, tiny" in capsys.readouterr().err


def one_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("warning:")]
    assert len(err) == 1, err
    return err[0]


def test_damaged_files_are_one_line_errors(tiny_run, data, tmp_path, capsys):
    """The cases a new user hit: a truncated ema.safetensors, a corrupt latent shard, a damaged export."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    ema = run / "checkpoints/step_6/ema.safetensors"
    ema.write_bytes(ema.read_bytes()[: ema.stat().st_size // 2])
    assert main(["sample", "--run", str(run), "--prompt", "a red square", "--steps", "2", "--out",
                 str(tmp_path / "s")]) == 2
    assert "damaged checkpoint" in (line := one_line(capsys)) and "ema.safetensors has" in line
    cache = tmp_path / "latents"
    shutil.copytree(data["latents"], cache)
    shard = next(cache.glob("latents-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:200])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(config_dict(data, data={"path": str(cache)}, train={"max_steps": 2})))
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "t")]) == 2
    assert f"damaged latent cache {cache}: {shard.name} has 200 bytes" in one_line(capsys)
    exported = tmp_path / "exported"
    assert main(["export", "--run", str(tiny_run), "--out", str(exported)]) == 0
    capsys.readouterr()
    (exported / "vae" / "config.json").write_text("{}")
    assert main(["sample", "--run", str(exported), "--prompt", "a red square", "--out", str(tmp_path / "e")]) == 2
    assert "damaged pipeline" in (line := one_line(capsys)) and "vae/config.json" in line


@pytest.mark.parametrize("value", ["nan", "1e30", "-1", "inf"])
def test_absurd_numbers_are_refused(tiny_run, tmp_path, capsys, value):
    """The library checks the guidance scale (the command line only parses it): one line, nothing written."""
    assert main(["sample", "--run", str(tiny_run), "--prompt", "a red square", "--cfg", value, "--out",
                 str(tmp_path / "s")]) == 2
    assert "cfg_scale must be a number in [0, 100]" in one_line(capsys)
    assert not (tmp_path / "s").exists()
    assert main(["sample", "--run", str(tiny_run), "--prompt", "a red square", "--guidance-rescale", value, "--out",
                 str(tmp_path / "s")]) == 2
    assert "guidance_rescale must be a number in [0, 1]" in one_line(capsys)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("key,value", [("optim.lr", ".nan"), ("optim.lr", ".inf"), ("train.max_steps", ".inf"),
                                       ("train.batch_size", ".nan"), ("model.init_std", "-.inf")])
def test_non_finite_config_values_are_refused(data, tmp_path, capsys, key, value):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(config_dict(data)))
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "t"), "--set", f"{key}={value}"]) == 2
    assert key.split(".")[-1] in one_line(capsys)


def test_a_folder_without_images_is_an_error(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "notes.txt").write_text("no images here")
    assert main(["data", "folder", "--src", str(src), "--out", str(tmp_path / "out"), "--size", "16"]) == 2
    assert "no image imported" in one_line(capsys)


def test_info_of_a_training_config_from_a_language_model_adds_the_training_memory(tmp_path):
    from helpers import make_tiny_lm

    make_tiny_lm(tmp_path / "lm", "qwen2", tie=True)
    r = tmot("info", "--config", "lmfusion-shapes", "--set", f"model.init_from={tmp_path / 'lm'}", "--json",
             "--world-size", "2")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    memory = info["training_memory"]
    assert memory["freeze"] == ["text"] and memory["trainable_params"] + memory["frozen_params"] == info["total_params"]
    # the frozen text side is the LM: its parameters, less nothing (tied head), are the frozen ones
    assert memory["frozen_params"] == info["params_per_modality"]["text"] - 2 * 32  # BOI/EOI rows train
    gib = memory["trainable_params"] * 16 / 2 + memory["frozen_params"] * 4 / 2
    assert memory["total_per_process_gib"] == pytest.approx(gib / 2**30, abs=1e-3)
    assert info["init_from"] == str(tmp_path / "lm")
