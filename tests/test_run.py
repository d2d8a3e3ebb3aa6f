"""Run configs (sections, strict keys, model files and shipped names, precision) and loading a run's model."""

import pytest
import torch
import yaml
from helpers import REPO, config_dict, make_config

from transfusion_mot.common.errors import ConfigError
from transfusion_mot.run import load_run_config, run_config_from_dict, save_run_config


def test_shipped_train_configs_load():
    for name in ("shapes-tiny", "emoji-tiny", "coco-760m"):
        cfg = load_run_config(REPO / "configs" / "train" / f"{name}.yaml")
        assert cfg.optim.betas == [0.9, 0.95]
    coco = load_run_config(REPO / "configs/train/coco-760m.yaml")
    assert coco.model.dim == 1536 and coco.model.latent_channels == 4  # base file + in-file change
    assert coco.data.kind == "webdataset" and coco.data.packing
    tiny = load_run_config(REPO / "configs/train/shapes-tiny.yaml", ["model.untie=[]", "optim.lr=0.01"])
    assert tiny.model.untie == [] and tiny.optim.lr == 0.01 and tiny.model.dim == 128


def test_the_shipped_lmfusion_config_takes_its_shape_from_the_language_model(tmp_path):
    from helpers import make_tiny_lm

    names = {p.stem for p in (REPO / "configs" / "train").glob("*.yaml")}
    assert names == {"shapes-tiny", "emoji-tiny", "coco-760m", "lmfusion-shapes"}  # every one loaded in a test
    make_tiny_lm(tmp_path, "qwen2", tie=True)  # stands in for its Qwen/Qwen2.5-0.5B (no download in tests)
    cfg = load_run_config("lmfusion-shapes", [f"model.init_from={tmp_path}"])
    assert (cfg.model.dim, cfg.model.qkv_bias, cfg.model.tie_embeddings, cfg.tokenizer.kind) == (32, True, True,
                                                                                                  "pretrained")
    assert cfg.train.freeze == ["text"] and cfg.model.copy_experts and cfg.model.objective == "flow"
    saved = tmp_path / "config.yaml"  # a run's config.yaml loads without the language model
    save_run_config(cfg, saved)
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


def test_resolved_config_round_trips(tmp_path, data):
    cfg = make_config(data, ["train.seed=3"])
    save_run_config(cfg, tmp_path / "config.yaml")
    assert load_run_config(tmp_path / "config.yaml") == cfg


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
