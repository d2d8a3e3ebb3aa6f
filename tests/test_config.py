"""Strict config loading: unknown keys and bad values fail with the key named; shipped configs load; run
configs take model files, overrides and settings, compare by key and make their paths absolute."""

from pathlib import Path

import pytest
import torch
import yaml
from helpers import REPO, config_dict, make_config

from transfusion_mot.common.errors import ConfigError, InputNotFound
from transfusion_mot.config import ModelConfig, load_run_config, run_config_from_dict

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


def test_shipped_train_configs_load():
    for name in ("shapes-tiny", "emoji-tiny", "coco-760m"):
        cfg = load_run_config(REPO / "configs" / "train" / f"{name}.yaml")
        assert cfg.optim.betas == [0.9, 0.95]
    coco = load_run_config(REPO / "configs/train/coco-760m.yaml")
    assert coco.model.dim == 1536 and coco.model.latent_channels == 4  # base file + in-file change
    assert coco.data.kind == "webdataset" and coco.data.packing
    tiny = load_run_config(REPO / "configs/train/shapes-tiny.yaml", ["model.untie=[]", "optim.lr=0.01"])
    assert tiny.model.untie == [] and tiny.optim.lr == 0.01 and tiny.model.dim == 128
    chameleon = load_run_config("shapes-chameleon-tiny")  # the same tiny model, images as 256 VQ codes
    assert (chameleon.model.image_objective, chameleon.model.image_attention, chameleon.model.codebook_size,
            chameleon.model.image_loss_weight, chameleon.model.dim) == ("tokens", "causal", 256, 1.0, 128)


def test_the_shipped_lmfusion_config_takes_its_shape_from_the_language_model(tmp_path):
    from helpers import make_tiny_lm

    names = {p.stem for p in (REPO / "configs" / "train").glob("*.yaml")}
    assert names == {"shapes-tiny", "emoji-tiny", "coco-760m", "lmfusion-shapes",
                     "shapes-chameleon-tiny"}  # every one loaded in a test
    make_tiny_lm(tmp_path, "qwen2", tie=True)  # stands in for its Qwen/Qwen2.5-0.5B (no download in tests)
    cfg = load_run_config("lmfusion-shapes", [f"model.init_from={tmp_path}"])
    assert (cfg.model.dim, cfg.model.qkv_bias, cfg.model.tie_embeddings, cfg.tokenizer.kind) == (32, True, True,
                                                                                                  "pretrained")
    assert cfg.train.freeze == ["text"] and cfg.model.copy_experts and cfg.model.objective == "flow"
    saved = tmp_path / "config.yaml"  # a run's config loads without the language model
    saved.write_text(cfg.to_yaml())
    assert load_run_config(saved, resolve_pretrained=False) == cfg


def test_unknown_keys_name_their_path(tmp_path, data):
    with pytest.raises(ConfigError, match=r"'train\.max_stpes'"):
        make_config(data, ["train.max_stpes=3"])
    with pytest.raises(ConfigError, match=r"'model\.dimm'"):
        make_config(data, ["model.dimm=3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**config_dict(data), "optimizer": {"lr": 1}}))
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown config key 'optimizer'"):
        load_run_config(bad)


def test_builtin_vae_is_trained_or_shipped():
    assert load_run_config("shapes-tiny").data.builtin_vae == "shipped"  # the demo's recipe starts from it
    assert load_run_config("emoji-tiny").data.builtin_vae == "train"  # no VAE is shipped for emoji
    with pytest.raises(ConfigError, match=r"builtin_vae must be one of \['train', 'shipped'\], got 'download'"):
        load_run_config("shapes-tiny", ["data.builtin_vae=download"])


def test_resolved_config_round_trips_and_names_its_differences(tmp_path, data):
    cfg = make_config(data, ["train.seed=3"])
    (tmp_path / "config.yaml").write_text(cfg.to_yaml())
    again = load_run_config(tmp_path / "config.yaml")
    assert again == cfg and again.differences(cfg) == []
    other = make_config(data, ["train.seed=4", "optim.lr=0.5", "train.max_steps=9"])
    assert cfg.differences(other) == ["optim.lr", "train.max_steps", "train.seed"]
    assert cfg.differences(other, ignore=("train.max_steps",)) == ["optim.lr", "train.seed"]


def test_settings_are_taken_as_they_are_after_the_overrides(data):
    """Command-line flags become settings: a path that YAML would read as a number or a boolean stays a string,
    and a setting wins over an override of the same key."""
    cfg = run_config_from_dict(config_dict(data), ["train.max_steps=7", "data.path=ignored"],
                               {"data.path": "123", "vae.path": "yes", "train.max_steps": 9})
    assert (cfg.data.path, cfg.vae.path, cfg.train.max_steps) == ("123", "yes", 9)


def test_paths_are_made_absolute_where_they_exist_and_the_data_kind_is_told(tmp_path, data, monkeypatch):
    """Loading resolves a config's paths from where it is loaded (the run directory keeps absolute ones) and
    data.kind auto from what data.path holds."""
    monkeypatch.chdir(data["latents"].parent)
    cfg = make_config(data, [f"data.path={data['latents'].name}", "vae.path=org/hub-vae", "data.val_path=missing/cache",
                             "data.kind=auto"])
    assert cfg.data.path == str(data["latents"].resolve()) and cfg.data.kind == "latents"  # on this machine
    assert cfg.vae.path == "org/hub-vae" and cfg.data.val_path == "missing/cache"  # a hub id, a path not here
    folder = make_config(data, [f"data.path={data['folder'].name}", "data.kind=auto"])
    assert folder.data.kind == "folder"
    absent = make_config(data, ["data.path=nowhere", "data.kind=auto"])  # not here (yet): told when the run starts
    assert absent.data.kind == "auto" and absent.data.path == "nowhere"
    from transfusion_mot.data.sources import open_source

    with pytest.raises(InputNotFound, match="data.path nowhere: not found"):
        open_source(absent.data)
