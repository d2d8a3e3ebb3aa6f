"""Strict config loading: unknown keys and bad values fail with the key named; shipped configs load."""

from pathlib import Path

import pytest
import torch

from transfusion_mot.config import ModelConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"








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
