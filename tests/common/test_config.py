"""Strict configs: unknown keys and bad values named by path, overrides, missing files, shipped names."""

import pytest

from transfusion_mot.common.config import load_yaml_config
from transfusion_mot.common.errors import ConfigError
from transfusion_mot.config import ModelConfig


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


def test_numbers_written_without_a_dot_are_numbers(tmp_path):
    """YAML 1.1 (PyYAML) reads `3e-4` as the string "3e-4": a number field takes it as the number, in a
    file and in an override; words stay errors."""
    p = tmp_path / "c.yaml"
    p.write_text("init_std: 2e-2\nrope_theta: 1E+4\n")
    cfg = load_yaml_config(ModelConfig, p, ["norm_eps=1e-6"])
    assert (cfg.init_std, cfg.rope_theta, cfg.norm_eps) == (0.02, 10000.0, 1e-6)
    assert isinstance(cfg.init_std, float)
    for bad in ("norm_eps=1e", "norm_eps=e-4", "norm_eps=small"):
        with pytest.raises(ConfigError, match="norm_eps: expected a number"):
            load_yaml_config(ModelConfig, p, [bad])


def test_shipped_configs_by_name_or_path(tmp_path):
    from transfusion_mot.common.config import resolve_config_path, shipped_config_names, shipped_configs_dir

    root = shipped_configs_dir()
    assert shipped_config_names("train") == ["coco-760m", "emoji-tiny", "lmfusion-shapes", "shapes-chameleon-tiny",
                                             "shapes-tiny"]
    assert "760m" in shipped_config_names("model") and {"tiny-32", "vq-tiny-32"} <= set(shipped_config_names("vae"))
    assert resolve_config_path("shapes-tiny", "train") == root / "train" / "shapes-tiny.yaml"
    assert resolve_config_path("shapes-tiny.yaml", "train") == root / "train" / "shapes-tiny.yaml"
    mine = tmp_path / "shapes-tiny.yaml"  # a file that exists wins over a shipped name
    mine.write_text("x: 1\n")
    assert resolve_config_path(mine, "train") == mine
    with pytest.raises(ConfigError, match=r"config not found: nope .*shipped train config: coco-760m, emoji-tiny, lmfusion-shapes, "
                                          r"shapes-chameleon-tiny, shapes-tiny"):
        resolve_config_path("nope", "train")
    with pytest.raises(ConfigError, match="config not found"):
        resolve_config_path("sub/shapes-tiny", "train")  # a path is never a name
