"""MFU: the peak table, the `train.peak_tflops` override, and the ratio itself."""

import pytest
import torch

from transfusion_mot.common import throughput
from transfusion_mot.common.throughput import mfu, peak_tflops


def test_cpu_has_no_peak_unless_one_is_set():
    assert peak_tflops(torch.device("cpu")) is None
    assert peak_tflops(torch.device("cpu"), override=2.5) == 2.5


@pytest.mark.parametrize("name,expected", [("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0),
                                           ("NVIDIA H200", 989.4), ("NVIDIA A100-SXM4-80GB", 312.0),
                                           ("NVIDIA L40S", 362.1), ("NVIDIA L4", 121.0), ("Some Future GPU", None)])
def test_known_gpus_are_looked_up_by_name(monkeypatch, name, expected):
    monkeypatch.setattr(throughput.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(throughput.torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_tflops(torch.device("cuda", 0)) == expected
    assert peak_tflops(torch.device("cuda", 0), override=100.0) == 100.0


def test_mfu_is_achieved_flops_over_the_summed_peak():
    # 3.2e16 FLOPs in 10 s on 8 devices of 989.4 TFLOP/s: 3.2e15 FLOP/s / 7.9152e15 FLOP/s = 40.43%
    assert mfu(3.2e16, 10.0, 989.4, 8) == pytest.approx(0.404285, rel=1e-5)
    assert mfu(3.2e16, 10.0, 989.4, 4) == pytest.approx(0.808571, rel=1e-5)  # half the devices: twice the share
    assert mfu(1.0, 1.0, None, 1) is None
