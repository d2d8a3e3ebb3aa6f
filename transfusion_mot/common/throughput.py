"""Model FLOPs utilisation: the training FLOPs a step needed (`accounting.batch_train_flops`) per second,
over what the devices can do at most.

Peaks are dense bf16 tensor-core throughput (no 2:4 sparsity) from the vendors' data sheets, matched
against `torch.cuda.get_device_name()`; `train.peak_tflops` sets the peak for anything else (per device,
in TFLOP/s), and is the only way to get an MFU on a CPU.
"""

from __future__ import annotations

from typing import Any

import torch

# dense bf16 TFLOP/s per device; the first name contained in the device name wins, so longer names first
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GB200", 2500.0),
    ("B200", 2250.0),
    ("H200", 989.4),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),  # SXM
    ("H800", 989.4),
    ("H20", 148.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 6000 Ada", 364.2),
    ("RTX 4090", 165.2),
    ("RTX 3090", 71.0),
    ("MI300X", 1307.4),
    ("MI325X", 1307.4),
    ("MI250X", 383.0),
)


def peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """Peak dense bf16 TFLOP/s of one `device`: `override` when set, the table's entry for a known GPU,
    else None (CPUs, unknown GPUs: no MFU is reported)."""
    if override:
        return float(override)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return tflops
    return None


def mfu(flops: float, seconds: float, peak: float | None, world_size: int) -> float | None:
    """Achieved FLOP/s of all processes over their summed peak; None without a peak."""
    if peak is None or seconds <= 0:
        return None
    return flops / seconds / (peak * 1e12 * world_size)


class ThroughputWindow:
    """tokens/s, MFU and the padding fraction of the training steps since the last metrics line (`take`): the
    time counted is the steps' own (`seconds` of each step's statistics), so evaluations, checkpoints and
    logging between them do not lower the throughput."""

    KEYS = ("tokens", "flops", "padding", "positions", "seconds")

    def __init__(self, device: torch.device, peak_override: float | None, world_size: int) -> None:
        self.peak = peak_tflops(device, peak_override)
        self.world_size = world_size
        self.sums = dict.fromkeys(self.KEYS, 0.0)

    def add(self, stats: Any) -> None:
        """One step's statistics (tokens, flops, padding, positions, seconds)."""
        for key in self.KEYS:
            self.sums[key] += getattr(stats, key)

    def take(self) -> dict[str, float | None]:
        """{tokens_per_s, mfu, padding_fraction} of the window, which then starts again."""
        s, self.sums = self.sums, dict.fromkeys(self.KEYS, 0.0)
        seconds = max(s["seconds"], 1e-9)
        return {"tokens_per_s": s["tokens"] / seconds, "mfu": mfu(s["flops"], seconds, self.peak, self.world_size),
                "padding_fraction": s["padding"] / max(s["positions"], 1.0)}


__all__ = ["PEAK_BF16_TFLOPS", "ThroughputWindow", "mfu", "peak_tflops"]
