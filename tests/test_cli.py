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
