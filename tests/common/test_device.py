"""Device choice: auto is CUDA when present, else the CPU; asking for CUDA without one is a user error."""

import pytest
import torch

from transfusion_mot.common.device import resolve_device, resolve_precision
from transfusion_mot.common.errors import InvalidInput


def test_auto_cpu_and_given_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("meta")) == torch.device("meta")
    with pytest.raises(InvalidInput, match="no CUDA device is available"):
        resolve_device("cuda")
    with pytest.raises(InvalidInput, match="no CUDA device is available"):
        resolve_device("cuda:1")
    with pytest.raises(InvalidInput, match="unknown device 'tpu0'"):
        resolve_device("tpu0")


def test_auto_picks_this_process_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto", local_rank=3) == torch.device("cuda", 3)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)


def test_precision_auto_is_bf16_only_where_native(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    for caps, expected in (({"avx512_bf16": False, "amx_bf16": False}, "fp32"), ({"avx512_bf16": True}, "bf16"),
                           ({"amx_bf16": True}, "bf16")):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda caps=caps: caps)
        assert resolve_precision("auto", cpu) == expected
    from transfusion_mot.common.errors import ConfigError
    from transfusion_mot.config import run_config_from_dict

    with pytest.raises(ConfigError, match="precision must be one of"):
        run_config_from_dict({"train": {"precision": "fp16"}})
