"""Strict config loading: unknown keys and bad values fail with the key named; shipped configs load."""

from pathlib import Path

import pytest
import torch

from transfusion_mot.common.config import load_yaml_config
from transfusion_mot.common.errors import ConfigError
from transfusion_mot.config import ModelConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("dim: 64\nn_heads: 4\nfnn_dim: 128\n")
    with pytest.raises(ConfigError, match="unknown config key 'fnn_dim'"):
        ModelConfig.from_yaml(p)


@pytest.mark.parametrize("text,match", [
    ("untie: [ffn, router]", "untie: unknown group"),
    ("dim: 65\nn_heads: 4", "divisible by n_heads"),
    ("qk_norm: maybe", "qk_norm: expected true/false"),
    ("dim: 6.5", "dim: expected an integer"),
    ("modalities: [text]", "must include 'image'"),
    ("norm_placement: sandwich", "norm_placement must be one of"),
    ("objective: gan", "objective must be one of"),
    ("untie: ffn", "untie: expected a list"),
])
def test_bad_values(tmp_path, text, match):
    p = tmp_path / "c.yaml"
    p.write_text(text + "\n")
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_yaml(p)


def test_overrides_and_missing_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("dim: 64\nn_heads: 4\n")
    cfg = load_yaml_config(ModelConfig, p, ["untie=[]", "n_layers=3"])
    assert cfg.untie == [] and cfg.n_layers == 3 and cfg.dim == 64
    with pytest.raises(ConfigError, match="unknown config key 'depth'"):
        load_yaml_config(ModelConfig, p, ["depth=3"])
    with pytest.raises(ConfigError, match="not found"):
        ModelConfig.from_yaml(tmp_path / "nope.yaml")


@pytest.mark.parametrize("name", ["tiny", "163m", "760m", "1.4b", "7b"])
def test_shipped_model_configs_load(name):
    cfg = ModelConfig.from_yaml(CONFIGS / f"{name}.yaml")
    assert set(cfg.untie) == {"attn", "ffn", "norm"}


def test_tiny_config_is_cpu_sized():
    from transfusion_mot.model import TransfusionMoT

    n = sum(p.numel() for p in TransfusionMoT(ModelConfig.from_yaml(CONFIGS / "tiny.yaml")).parameters())
    assert 1_000_000 <= n <= 5_000_000


@pytest.mark.parametrize("name,dense_params", [("163m", 163e6), ("760m", 760e6), ("1.4b", 1.4e9)])
def test_paper_shapes_have_their_dense_size(name, dense_params):
    import dataclasses

    from transfusion_mot.model import TransfusionMoT

    cfg = dataclasses.replace(ModelConfig.from_yaml(CONFIGS / f"{name}.yaml"), untie=[])
    with torch.device("meta"):
        n = sum(p.numel() for p in TransfusionMoT(cfg).parameters())
    assert abs(n - dense_params) / dense_params < 0.05
