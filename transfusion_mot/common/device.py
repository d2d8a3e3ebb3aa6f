"""Which device a command runs on: "auto" is CUDA when there is one (this process's local GPU under
torchrun), else the CPU; asking for CUDA where there is none is the user's mistake, said in one line. And
which precision a run computes in there."""

from __future__ import annotations

import torch

from .errors import InvalidInput


def resolve_device(name: str | torch.device | None = "auto", local_rank: int = 0) -> torch.device:
    if isinstance(name, torch.device):
        return name
    if name is None or name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise InvalidInput(f"device {name!r} asked for, but no CUDA device is available (use cpu or auto)")
    if name == "cuda":
        return torch.device("cuda", local_rank)
    try:
        return torch.device(name)
    except RuntimeError:
        raise InvalidInput(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None


def resolve_precision(precision: str, device: torch.device) -> str:
    """"fp32" or "bf16" for train.precision on `device` ("auto": bf16 only where it is native: CUDA with bf16,
    CPUs with AVX512-BF16 or AMX; elsewhere a CPU emulates it, about 2x slower than fp32)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
        return "bf16" if caps.get("avx512_bf16") or caps.get("amx_bf16") else "fp32"
    return "fp32"


__all__ = ["resolve_device", "resolve_precision"]
