"""Checkpoints of a run: written to a temporary directory and renamed, so a crash, a full disk or a kill
at any moment leaves the previous checkpoint whole.

Layout of RUN/checkpoints/step_N/:
    model.safetensors        full (unsharded) fp32 weights of the plain TransfusionMoT, safetensors
    ema.safetensors          EMA of the weights (what sampling uses by default), when EMA is on
    optimizer.pt             full optimizer state keyed by parameter name (torch.load(weights_only=True))
    rank_K.pt                per-process state: every RNG, data-stream positions (weights_only loadable)
    state.json               step, world size, counters; written last, so its presence marks completeness
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any


from torch import Tensor

CHECKPOINT_DIR = "checkpoints"
STEP_RE = re.compile(r"^step_(\d+)$")
WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def clean_key(key: str) -> str:
    """State-dict key of the plain model: drop the prefixes activation checkpointing / compile add."""
    for prefix in WRAPPER_PREFIXES:
        key = key.replace(prefix, "")
    return key


def full_tensor(t: Tensor) -> Tensor:
    """Unsharded copy of a (possibly FSDP2 DTensor) tensor; a collective for DTensors."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach()


def full_state_dict(named: dict[str, Tensor]) -> dict[str, Tensor]:
    """{clean name: fp32 CPU tensor}; every rank must call it (DTensor gathers are collectives)."""
    return {clean_key(k): full_tensor(v).float().cpu().contiguous() for k, v in named.items()}


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINT_DIR
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = STEP_RE.match(p.name)
            if m and (p / "state.json").is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def resolve_checkpoint(run_dir: str | Path, step: int | None = None) -> Path:
    """The checkpoint of `step` (default: the latest), or FileNotFoundError naming what exists."""
    found = list_checkpoints(run_dir)
    if not found:
        raise FileNotFoundError(f"{run_dir}: no checkpoint found under {CHECKPOINT_DIR}/ (is this a run "
                                "directory written by `tmot train`?)")
    if step is None:
        return found[-1][1]
    for s, p in found:
        if s == step:
            return p
    raise FileNotFoundError(f"{run_dir}: no checkpoint for step {step} (have {[s for s, _ in found]})")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def staging_dir(run_dir: str | Path, step: int) -> Path:
    """Where step N is written before the rename (hidden, so readers never pick it up)."""
    return Path(run_dir) / CHECKPOINT_DIR / f".tmp-step_{step}"


def begin_checkpoint(run_dir: str | Path, step: int) -> Path:
    tmp = staging_dir(run_dir, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def save_tensors(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)


def commit_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write state.json into the staged directory, rename it to step_N, then prune to the last `keep`."""
    tmp = staging_dir(run_dir, step)
    with open(tmp / "state.json", "w") as f:
        json.dump(state, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    for p in tmp.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    final = Path(run_dir) / CHECKPOINT_DIR / f"step_{step}"
    if final.exists():  # re-saving the same step (e.g. a stop right after a periodic save)
        old = final.with_name(f".old-step_{step}")
        if old.exists():
            shutil.rmtree(old)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(final.parent)
    if keep > 0:
        for _, p in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
    return final


def abort_checkpoint(run_dir: str | Path, step: int) -> None:
    shutil.rmtree(staging_dir(run_dir, step), ignore_errors=True)


def load_tensors(path: str | Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def load_model_weights(checkpoint: str | Path, ema: bool = True) -> tuple[dict[str, Tensor], str]:
    """Weights of a checkpoint directory for inference: EMA if present and asked for, else the raw
    weights. Returns (state dict, which file)."""
    checkpoint = Path(checkpoint)
    names = ["ema.safetensors", "model.safetensors"] if ema else ["model.safetensors"]
    for name in names:
        if (checkpoint / name).is_file():
            return load_tensors(checkpoint / name), name
    raise FileNotFoundError(f"{checkpoint}: no model.safetensors (incomplete or foreign checkpoint)")
