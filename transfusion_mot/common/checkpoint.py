"""One checkpointer for every training loop of the project (the MoT, the VAE, the shapes classifier).

A checkpoint is a directory ROOT/step_N/ holding one file per stateful part and `state.json`. It is written
to ROOT/.tmp-step_N/ and renamed when complete (state.json last), so a crash, a full disk or a kill at any
moment leaves every earlier checkpoint whole, and only complete checkpoints are ever listed. The last `keep`
checkpoints are kept.

Parts own their state (`state_dict()` / `load_state_dict()`, as torch modules and optimizers do); the
checkpointer only decides where it goes. A part's file name says how it is stored:
    NAME.safetensors   a flat {name: tensor} state (weights): safetensors
    NAME.pt            tensors, numbers, strings and containers: torch.save, read back with weights_only=True
    NAME.json          a JSON-able state
    NAME               (no suffix) a directory part: `save_to(path)` / `load_from(path)`, called on every
                       process (sharded state that each process writes its share of)
A name with `{rank}` is written by every process (its own RNG and data position); the other files by the
main process only. `state.json` holds the step and the `progress` part's state (counters, world size, ...).
A file that cannot be read back names the damaged checkpoint in the error.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from .errors import InputNotFound, TrainingError, describe
from .files import file_manifest, manifest_problem
from .tensors import full_state_dict, load_full_into

STATE_FILE = "state.json"
STEP_RE = re.compile(r"^step_(\d+)$")


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


class DirectoryPart(Protocol):
    def save_to(self, path: Path) -> None: ...

    def load_from(self, path: Path) -> None: ...


def is_directory_part(name: str) -> bool:
    return Path(name).suffix == ""


class CheckpointSaveError(TrainingError):
    """A checkpoint could not be written (disk full, permissions); every earlier checkpoint is intact."""


# --------------------------------------------------------------------------------------------------
# finding checkpoints


def list_checkpoints(root: str | Path, legacy_marker: str | None = None) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root`, oldest first (complete: renamed into place, with state.json or,
    for checkpoints written before state.json existed, `legacy_marker`)."""
    root = Path(root)
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = STEP_RE.match(p.name)
            if m and ((p / STATE_FILE).is_file() or (legacy_marker and (p / legacy_marker).is_file())):
                found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: str | Path, legacy_marker: str | None = None) -> Path | None:
    found = list_checkpoints(root, legacy_marker)
    return found[-1][1] if found else None


def resolve_checkpoint(root: str | Path, step: int | None = None, what: str = "") -> Path:
    """The checkpoint of `step` (default: the latest), or InputNotFound naming what exists."""
    found = list_checkpoints(root)
    where = what or str(root)
    if not found:
        raise InputNotFound(f"{where}: no checkpoint found under {root} (is this a run directory written by "
                            "`tmot train`?)")
    if step is None:
        _warn_incomplete_newer(Path(root), found[-1][0])
        return found[-1][1]
    for s, p in found:
        if s == step:
            return p
    raise InputNotFound(f"{where}: no checkpoint for step {step} (have {[s for s, _ in found]})")


def _warn_incomplete_newer(root: Path, step: int) -> None:
    """Say so when a newer step directory exists but never completed (a save that was cut off)."""
    newer = sorted(int(m.group(1)) for p in root.iterdir() if (m := STEP_RE.match(p.name)) and int(m.group(1)) > step)
    if newer:
        print(f"warning: {root}/step_{newer[-1]} is incomplete (no {STATE_FILE}: a save that did not finish); "
              f"using step_{step}", file=sys.stderr)


def read_state(checkpoint: str | Path) -> dict[str, Any]:
    """The checkpoint's state.json (step and progress counters)."""
    return _read(Path(checkpoint) / STATE_FILE)


def verify_checkpoint(checkpoint: str | Path) -> None:
    """TrainingError naming the first file of `checkpoint` that is missing, cut short or changed since it
    was written (state.json records every file's size and sha256; older checkpoints are not checked)."""
    checkpoint = Path(checkpoint)
    state = read_state(checkpoint)
    if not isinstance(state, dict):
        raise TrainingError(f"damaged checkpoint {checkpoint}: {STATE_FILE} is not an object")
    problem = manifest_problem(checkpoint, state["files"]) if isinstance(state.get("files"), dict) else None
    if problem:
        raise TrainingError(f"damaged checkpoint {checkpoint}: {problem}")


def latest_intact_checkpoint(root: str | Path, report: Callable[[str], None] = lambda message: None) -> Path | None:
    """The newest checkpoint under `root` that passes `verify_checkpoint`; each damaged newer one is
    reported (one line) and skipped."""
    for step, path in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(path)
            _warn_incomplete_newer(Path(root), step)
            return path
        except TrainingError as err:
            report(f"warning: {err}; using an older checkpoint")
    return None


# --------------------------------------------------------------------------------------------------
# files


def save_tensors(tensors: Mapping[str, Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def load_tensors(path: str | Path) -> dict[str, Tensor]:
    """A safetensors file; a damaged file is a TrainingError naming it."""
    return _read(Path(path))


def _write(path: Path, state: Any, metadata: dict[str, str] | None) -> None:
    if path.suffix == ".safetensors":
        if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
            raise TypeError(f"{path.name}: a .safetensors part must have a flat {{name: tensor}} state")
        save_tensors(state, path, metadata)
    elif path.suffix == ".pt":
        torch.save(state, path)
    elif path.suffix == ".json":
        path.write_text(json.dumps(state, indent=2, default=str) + "\n")
    else:
        raise ValueError(f"{path.name}: part files end in .safetensors, .pt or .json")


def _read(path: Path) -> Any:
    if not path.is_file():
        raise TrainingError(f"damaged checkpoint {path.parent}: {path.name} is missing")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        if path.suffix == ".pt":
            return torch.load(path, map_location="cpu", weights_only=True)
        return json.loads(path.read_text())
    except Exception as err:  # truncated, overwritten, not ours: name the file
        raise TrainingError(f"damaged checkpoint {path.parent}: cannot read {path.name} "
                            f"({describe(err)})") from None


def _fsync(path: Path) -> None:
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


# --------------------------------------------------------------------------------------------------
# the checkpointer


class Checkpointer:
    """Saves and loads a set of stateful parts as ROOT/step_N/ (see the module docstring).

    `parts`: file name -> part. `progress`: a part whose state goes into state.json (loaded first, so it can
    refuse a checkpoint before anything else changes). For several processes, `rank`, `is_main`,
    `any_rank(flag) -> bool` (true when any process passes true: an all-reduce) and `barrier()`; every
    process must call `save` (gathering sharded state is collective). `metadata` goes into every safetensors
    file. `legacy_marker`: a part file that marks completeness in checkpoints older than state.json."""

    def __init__(self, root: str | Path, parts: Mapping[str, Stateful], *, keep: int = 3,
                 progress: Stateful | None = None, metadata: dict[str, str] | None = None, rank: int = 0,
                 is_main: bool = True, any_rank: Callable[[bool], bool] = lambda flag: flag,
                 barrier: Callable[[], None] = lambda: None, legacy_marker: str | None = None) -> None:
        for name in parts:
            if name == STATE_FILE or Path(name).suffix not in (".safetensors", ".pt", ".json", ""):
                raise ValueError(f"checkpoint part {name!r}: files end in .safetensors, .pt or .json (no suffix: a "
                                 f"directory part) and {STATE_FILE} is the checkpointer's own")
        self.root = Path(root)
        self.parts = dict(parts)
        self.progress = progress
        self.keep = keep
        self.metadata = dict(metadata or {})
        self.rank, self.is_main = rank, is_main
        self.any_rank, self.barrier = any_rank, barrier
        self.legacy_marker = legacy_marker

    def checkpoints(self) -> list[tuple[int, Path]]:
        return list_checkpoints(self.root, self.legacy_marker)

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1][1] if found else None

    def _file(self, name: str) -> str:
        return name.format(rank=self.rank)

    def _writes(self, name: str) -> bool:
        return self.is_main or "{rank}" in name

    # -- saving ------------------------------------------------------------------------------------

    def save(self, step: int) -> Path:
        """Write checkpoint `step` and prune to the last `keep`. On failure every earlier checkpoint is left
        bit-identical and CheckpointSaveError is raised on every process."""
        states = {name: part.state_dict() for name, part in self.parts.items()  # collectives on every rank
                  if not is_directory_part(name)}
        progress = self.progress.state_dict() if self.progress is not None else {}
        tmp = self.root / f".tmp-step_{step}"
        error: Exception | None = None
        try:
            if self.is_main:
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir(parents=True)
        except Exception as err:
            error = err
        self.barrier()
        try:
            if error is None:
                meta = {**self.metadata, "step": str(step)}
                for name, state in states.items():
                    if self._writes(name):
                        _write(tmp / self._file(name), state, meta)
        except Exception as err:  # disk full, permissions, ...
            error = error or err
        # directory parts write collectively, so every process calls them, whatever happened above
        for name, part in self.parts.items():
            if is_directory_part(name):
                try:
                    part.save_to(tmp / name)
                except Exception as err:
                    error = error or err
        failed = self.any_rank(error is not None)
        final = self.root / f"step_{step}"
        if not failed and self.is_main:
            try:
                self._commit(tmp, final, {"step": step, **progress})
            except Exception as err:
                error = err
        failed = self.any_rank(failed or error is not None)  # every process learns whether the commit worked
        if failed:
            if self.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            self.barrier()
            reason = f"{type(error).__name__}: {error}" if error is not None else "another process failed"
            raise CheckpointSaveError(f"could not save checkpoint {final} ({reason}); the previous checkpoint "
                                      f"{self.latest() or '(none)'} is intact")
        self.barrier()
        return final

    def _commit(self, tmp: Path, final: Path, state: dict[str, Any]) -> None:
        state = {**state, "files": file_manifest(tmp, exclude=(STATE_FILE,))}  # checked by verify_checkpoint
        with open(tmp / STATE_FILE, "w") as f:
            json.dump(state, f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())
        for p in tmp.rglob("*"):
            if p.is_file():
                _fsync(p)
        if final.exists():  # saving the same step again (a stop right after a periodic save)
            old = final.with_name(f".old-{final.name}")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync(final.parent)
        if self.keep > 0:
            for _, p in self.checkpoints()[:-self.keep]:
                shutil.rmtree(p, ignore_errors=True)

    # -- loading -----------------------------------------------------------------------------------

    def read_part(self, checkpoint: str | Path, file: str) -> Any:
        """The saved state of one part file (e.g. another process's rank file); damage names the checkpoint."""
        return _read(Path(checkpoint) / file)

    def load(self, checkpoint: str | Path, parts: Mapping[str, Any] | None = None,
             verify: bool = True) -> dict[str, Any]:
        """Load every part (or `parts`, for a checkpoint saved in another layout) from `checkpoint`; returns
        its state.json ({"step": N, ...progress}). `verify=False` skips the content check for a checkpoint
        the caller has just verified (hashing a large checkpoint twice costs seconds)."""
        checkpoint = Path(checkpoint)
        if (checkpoint / STATE_FILE).is_file():
            if verify:
                verify_checkpoint(checkpoint)
            state = _read(checkpoint / STATE_FILE)
        else:  # older than state.json: the step is in the directory name
            m = STEP_RE.match(checkpoint.name)
            if not m or not (self.legacy_marker and (checkpoint / self.legacy_marker).is_file()):
                raise TrainingError(f"damaged checkpoint {checkpoint}: {STATE_FILE} is missing")
            state = {"step": int(m.group(1))}
        if self.progress is not None:
            self.progress.load_state_dict(state)
        for name, part in (self.parts if parts is None else parts).items():
            if is_directory_part(name):
                if not (checkpoint / name).is_dir():
                    raise TrainingError(f"damaged checkpoint {checkpoint}: {name}/ is missing")
                part.load_from(checkpoint / name)
            else:
                part.load_state_dict(_read(checkpoint / self._file(name)))
        return state


# --------------------------------------------------------------------------------------------------
# common parts


class ModuleWeights:
    """A module's weights (its state dict) as full fp32 tensors keyed by the plain module's names, whether or
    not it is sharded (FSDP2) or wrapped (compile, activation checkpointing): a `.safetensors` part. Saving
    gathers sharded tensors (a collective: every process calls it); loading keeps each process's shard."""

    def __init__(self, module: torch.nn.Module, what: str = "model weights") -> None:
        self.module, self.what = module, what

    def state_dict(self) -> dict[str, Tensor]:
        return full_state_dict(self.module.state_dict())

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        load_full_into(self.module.state_dict(), state, self.what)


class GeneratorState:
    """A torch.Generator's state (a byte tensor)."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def state_dict(self) -> Tensor:
        return self.generator.get_state()

    def load_state_dict(self, state: Tensor) -> None:
        self.generator.set_state(state)


class TorchRNGState:
    """The global torch RNG (and the CUDA one of `device`)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)

    def state_dict(self) -> dict[str, Tensor]:
        state = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        torch.set_rng_state(state["torch"])
        if self.device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)


class Bundle:
    """Several parts in one file: state {key: part state}."""

    def __init__(self, **parts: Stateful) -> None:
        self.parts = parts

    def state_dict(self) -> dict[str, Any]:
        return {key: part.state_dict() for key, part in self.parts.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = sorted(set(self.parts) - set(state))
        if missing:
            raise TrainingError(f"checkpoint state lacks {missing}")
        for key, part in self.parts.items():
            part.load_state_dict(state[key])


__all__ = ["Bundle", "CheckpointSaveError", "Checkpointer", "DirectoryPart", "GeneratorState", "ModuleWeights",
           "STATE_FILE", "Stateful", "TorchRNGState", "latest_checkpoint", "latest_intact_checkpoint", "list_checkpoints",
           "load_tensors", "read_state", "resolve_checkpoint", "save_tensors", "verify_checkpoint"]
