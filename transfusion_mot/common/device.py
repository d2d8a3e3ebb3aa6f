"""Which device a command runs on: "auto" is CUDA when there is one (this process's local GPU under
torchrun), else the CPU; asking for CUDA where there is none is the user's mistake, said in one line. And
which precision a run computes in there."""

from __future__ import annotations

import platform

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


def cpu_description() -> dict[str, object]:
    """The CPU a timing was taken on: model name, whether it has AVX-512, native bf16 (AVX512-BF16) and AMX, the
    instruction set torch's kernels run with (ATEN_CPU_CAPABILITY can lower it), and torch's thread count.
    Timings differ about 2x between the machine kinds, so every reported time carries this."""
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    model = _cpuinfo_model() or str(caps.get("cpu_name") or platform.processor() or platform.machine())
    return {"model": model, "avx512": bool(caps.get("avx512_f")), "avx512_bf16": bool(caps.get("avx512_bf16")),
            "amx": bool(caps.get("amx_bf16") or caps.get("amx_tile")),
            "kernels": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}


def cpu_summary(cpu: dict[str, object] | None = None) -> str:
    """One line for reports: "AMD EPYC (AVX2 only; torch kernels AVX2, 2 threads)"."""
    cpu = cpu or cpu_description()
    isa = "AMX" if cpu["amx"] else "AVX-512 with bf16" if cpu["avx512_bf16"] else "AVX-512" if cpu["avx512"] \
        else "AVX2 only"
    return f"{cpu['model']} ({isa}; torch kernels {cpu['kernels']}, {cpu['threads']} threads)"


def _cpuinfo_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


__all__ = ["cpu_description", "cpu_summary", "resolve_device", "resolve_precision"]
