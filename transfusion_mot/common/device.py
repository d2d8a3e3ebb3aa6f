"""Which device a command runs on: "auto" is CUDA when there is one (this process's local GPU under
torchrun), else the CPU; asking for CUDA where there is none is the user's mistake, said in one line."""

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


__all__ = ["resolve_device"]
