"""The run directory of `tmot train`, and the checkpoint format inside it: the one module that knows where a
run keeps what. Everything else asks a `RunDir` for a path, or for the thing itself.

    RUN/config.yaml             the fully resolved training config (a run directory is known by it)
    RUN/metrics.jsonl           one JSON object per logged step; TensorBoard events in RUN/tensorboard/
    RUN/summary.json            parameters, FLOPs, where and how the run trained, how it ended, held-out results
    RUN/evaluation.json         what `tmot demo` measured (the model card of an export states it)
    RUN/tokenizer.json          the BPE a run trained on its data's captions (tokenizer kind hf, path null)
    RUN/text_lm/                the language model's config.json and tokenizer (model.init_from)
    RUN/checkpoints/step_N/     one checkpoint, written whole or not at all (`common.checkpoint.Checkpointer`)

A checkpoint written by ONE process:
    model.safetensors   full fp32 weights of the plain TransfusionMoT
    ema.safetensors     EMA of the trained weights (what sampling uses by default), when EMA is on
    optimizer.pt        AdamW's state keyed by parameter name
    rank_0.pt           the process's own state: the data stream's position, the noise generator, torch's RNG
    state.json          step, world size, counters, the VAE, every file's size and sha256; written last
written by SEVERAL processes (torchrun + FSDP2):
    dcp/                a torch.distributed.checkpoint directory: model, ema and optimizer, each process
                        writing its own shards (so the run directory must be on a file system all share)
    rank_K.pt           one per process
    state.json

Why two layouts, not DCP always: a sharded run cannot write whole files without gathering every tensor onto
one process, which is what FSDP2 exists to avoid; a one-process run (the CPU path, the demo, every test)
can, and then its weights are plain safetensors files that any tool reads without torch.distributed, as
every earlier run directory has them. Both layouts resume on any number of processes (DCP re-shards on
load, whole files are split by each process), and `tmot export` consolidates either into one safetensors
file. With the same number of processes a resume is bit-exact; with another, each process's data position
is re-split from all the saved ones and its random streams are re-seeded.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .common import checkpoint as ckpt
from .common.checkpoint import Bundle, Checkpointer, CheckpointSaveError, GeneratorState, ModuleWeights, TorchRNGState
from .common.distributed import DistInfo, any_rank, barrier
from .common.errors import ConfigError, InputNotFound, InvalidInput, TrainingError, describe
from .common.files import read_jsonl, write_json
from .common.tensors import clean_key
from .config import RESUMABLE_KEYS, RunConfig, load_run_config
from .data.streams import Resplit

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
EVALUATION_FILE = "evaluation.json"
TOKENIZER_FILE = "tokenizer.json"
TENSORBOARD_DIR = "tensorboard"
LM_DIR = "text_lm"
CHECKPOINTS_DIR = "checkpoints"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
RANK_FILE = "rank_{rank}.pt"
SHARDED_DIR = "dcp"
CHECKPOINT_FORMAT = "tmot-checkpoint/1"
CONFIG_HEADER = "# The fully resolved training config of this run (written by tmot train).\n"


class RunDir:
    """A run directory (module docstring): its paths, its config, its checkpoints, what it reports."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config_file = self.path / CONFIG_FILE
        self.metrics_file = self.path / METRICS_FILE
        self.summary_file = self.path / SUMMARY_FILE
        self.evaluation_file = self.path / EVALUATION_FILE
        self.tokenizer_file = self.path / TOKENIZER_FILE
        self.tensorboard_dir = self.path / TENSORBOARD_DIR
        self.lm_dir = self.path / LM_DIR
        self.checkpoints_dir = self.path / CHECKPOINTS_DIR

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def exists(self) -> bool:
        return self.config_file.is_file()

    # -- the config --------------------------------------------------------------------------------

    def load_config(self) -> RunConfig:
        if not self.exists():
            raise InputNotFound(f"{self.path}: no {CONFIG_FILE} (not a run directory written by `tmot train`)")
        return load_run_config(self.config_file, resolve_pretrained=False)

    def begin(self, config: RunConfig, resume: bool, dist: DistInfo) -> Path | None:
        """Start a run here (or, `resume`, continue it): the checkpoint to resume from, None for a new run. A new
        run refuses a directory that holds checkpoints; a resumed one refuses changes to anything but
        run-control keys (`RESUMABLE_KEYS`) and passes over a damaged newest checkpoint, naming it. The main
        process writes the config; every process returns the same answer."""
        resume_from = self._resume_point(config, dist) if resume else None
        if not resume and self.latest_checkpoint() is not None:
            raise ConfigError(f"{self.path} already holds checkpoints: pass --resume to continue it, or choose a new "
                              "--out")
        if dist.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            self.config_file.write_text(CONFIG_HEADER + config.to_yaml())
        barrier(dist)
        return resume_from

    def _resume_point(self, config: RunConfig, dist: DistInfo) -> Path:
        if self.latest_checkpoint() is None:
            raise InputNotFound(f"--resume: no checkpoint in {self.checkpoints_dir} to resume from")
        report = (lambda message: print(message, file=sys.stderr)) if dist.is_main else (lambda message: None)
        checkpoint = ckpt.latest_intact_checkpoint(self.checkpoints_dir, report=report)
        if checkpoint is None:
            raise TrainingError(f"--resume: every checkpoint in {self.checkpoints_dir} is damaged (see above)")
        if self.exists():
            diff = self.load_config().differences(config, ignore=RESUMABLE_KEYS)
            if diff:
                raise ConfigError(f"--resume: the config differs from the run's {CONFIG_FILE} in {diff}; only "
                                  f"{', '.join(RESUMABLE_KEYS)} may change when resuming")
        return checkpoint

    # -- checkpoints -------------------------------------------------------------------------------

    def checkpoints(self) -> list[tuple[int, Path]]:
        """(step, path) of every complete checkpoint, oldest first."""
        return ckpt.list_checkpoints(self.checkpoints_dir)

    def latest_checkpoint(self) -> Path | None:
        return ckpt.latest_checkpoint(self.checkpoints_dir)

    def checkpoint(self, step: int | None = None) -> Path:
        """The checkpoint of `step` (default: the newest), checked against its manifest."""
        checkpoint = ckpt.resolve_checkpoint(self.checkpoints_dir, step, what=str(self.path))
        ckpt.verify_checkpoint(checkpoint)  # a damaged file is named here, not deep inside a reader
        return checkpoint

    def load_model(self, step: int | None = None, ema: bool = True,
                   device: str | torch.device = "cpu") -> tuple[Any, RunConfig, dict[str, Any]]:
        """(model in eval mode, run config, info) in one process, whatever number of processes trained it. info:
        checkpoint, step, which weights were loaded (EMA or raw), and the VAE the run trained with."""
        from .model import TransfusionMoT

        config = self.load_config()
        checkpoint = self.checkpoint(step)
        model = TransfusionMoT(config.model)
        shapes = {k: v.shape for k, v in model.state_dict().items()}
        state, which = load_inference_weights(checkpoint, shapes, ema=ema)
        wrong = [k for k, v in state.items() if k in shapes and v.shape != shapes[k]]
        if wrong:
            raise InvalidInput(f"{checkpoint}: {wrong[0]} has shape {tuple(state[wrong[0]].shape)} but the run's model "
                               f"config makes it {tuple(shapes[wrong[0]])} (weights of another model?)")
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise InvalidInput(f"{checkpoint}: weights do not match the run's model config "
                               f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        saved = ckpt.read_state(checkpoint)
        info = {"checkpoint": str(checkpoint), "step": saved["step"], "weights": which, "vae": saved.get("vae")}
        return model.to(device).eval(), config, info

    def export_text_lm(self, out: str | Path, step: int | None = None, ema: bool = True) -> Path:
        """The text side of a run started from a language model (model.init_from), written back as a transformers
        model of that architecture with its tokenizer (`AutoModelForCausalLM.from_pretrained(out)`). With the
        text frozen (train.freeze: [text]) it is the language model exactly as it was."""
        from .pretrained import export_text_lm

        model, config, _ = self.load_model(step=step, ema=ema)
        if not config.model.init_from:
            raise InvalidInput(f"{self.path}: --text-lm exports the language model a run started from, and this run "
                               "started from scratch (no model.init_from)")
        if not (self.lm_dir / "config.json").is_file():
            raise InputNotFound(f"{self.path}: no {LM_DIR}/config.json (the language model's config, saved by "
                                "`tmot train`); the run directory is incomplete")
        return export_text_lm({k: v.float() for k, v in model.state_dict().items()}, config.model, self.lm_dir, out)

    # -- what the run reports ----------------------------------------------------------------------

    def read_metrics(self) -> list[dict[str, Any]]:
        """The records of metrics.jsonl (one JSON object per logged step), in order."""
        if not self.metrics_file.is_file():
            raise InputNotFound(f"{self.path}: no {METRICS_FILE} (not a training run directory)")
        return read_jsonl(self.metrics_file)

    def read_summary(self) -> dict[str, Any]:
        return _read_json_object(self.summary_file)

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json(self.summary_file, summary)

    def read_evaluation(self) -> dict[str, Any]:
        return _read_json_object(self.evaluation_file)

    def write_evaluation(self, evaluation: dict[str, Any]) -> None:
        write_json(self.evaluation_file, evaluation)


def _read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file's object; {} when the file is missing or unreadable (a report not written yet)."""
    import json

    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


# --------------------------------------------------------------------------------------------------
# the parts of a training checkpoint


class OptimizerState:
    """AdamW's state keyed by parameter name (torch.distributed.checkpoint's full state dict)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self.model, self.optimizer, state, options=StateDictOptions(full_state_dict=True))


class ShardedWeights:
    """Model, EMA and optimizer state as a torch.distributed.checkpoint directory (a checkpointer directory
    part): each process writes and reads only its own shards, and DCP re-shards on load, so a checkpoint
    written by N processes loads on M (one included). Keys are the plain model's parameter names."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, ema: Any = None) -> None:
        self.model, self.optimizer, self.ema = model, optimizer, ema

    def _state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        state: dict[str, Any] = {"model": {clean_key(k): v for k, v in get_model_state_dict(self.model).items()}}
        if self.optimizer is not None:
            state["optimizer"] = get_optimizer_state_dict(self.model, self.optimizer)
        if self.ema is not None:
            state["ema"] = {clean_key(k): v for k, v in self.ema.shadow.items()}
        return state

    def save_to(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(), checkpoint_id=str(path))

    def load_from(self, path: Path) -> None:
        """Load in place (the EMA's shadow tensors are themselves in the state); a damaged directory is a
        TrainingError naming it."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        state = self._state()
        try:
            dcp.load(state, checkpoint_id=str(path))
        except (Exception, CheckpointException) as err:  # missing shards, truncated files, another model
            raise TrainingError(f"damaged checkpoint {path.parent}: cannot read {path.name}/ "
                                f"({describe(err, 300)})") from None
        set_model_state_dict(self.model, state["model"])
        if self.optimizer is not None:
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])


def read_sharded(checkpoint: Path, names_and_shapes: dict[str, torch.Size], which: str) -> dict[str, Tensor]:
    """Full fp32 tensors of `which` ("model" or "ema") from a checkpoint's DCP directory, in one process
    (inference, export): each tensor is assembled from every process's shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    state = {which: {name: torch.empty(shape) for name, shape in names_and_shapes.items()}}
    try:
        dcp.load(state, checkpoint_id=str(checkpoint / SHARDED_DIR), no_dist=True)
    except (Exception, CheckpointException) as err:  # DCP's own error is a BaseException
        raise TrainingError(f"damaged checkpoint {checkpoint}: cannot read {SHARDED_DIR}/ "
                            f"({describe(err, 300)})") from None
    return state[which]


def sharded_keys(checkpoint: Path, which: str) -> set[str]:
    """Tensor names under `which` ("model", "ema", "optimizer") in a checkpoint's DCP directory (empty when
    it holds none)."""
    import torch.distributed.checkpoint as dcp

    try:
        metadata = dcp.FileSystemReader(str(checkpoint / SHARDED_DIR)).read_metadata()
    except Exception as err:
        raise TrainingError(f"damaged checkpoint {checkpoint}: cannot read {SHARDED_DIR}/.metadata "
                            f"({type(err).__name__})") from None
    return {key[len(which) + 1:] for key in metadata.state_dict_metadata if key.startswith(which + ".")}


def load_inference_weights(checkpoint: str | Path, shapes: dict[str, torch.Size], ema: bool = True
                           ) -> tuple[dict[str, Tensor], str]:
    """(full weights, where they came from) of a checkpoint, in one process: the EMA if present and asked
    for, else the raw weights, from either layout (`shapes`: the model's tensor names and shapes). The EMA
    covers the trained parameters only: frozen ones (train.freeze) come from the raw weights, which equal
    them."""
    checkpoint = Path(checkpoint)
    sharded = (checkpoint / SHARDED_DIR).is_dir()
    if sharded:
        averaged = sharded_keys(checkpoint, "ema") if ema else set()
        state = read_sharded(checkpoint, {k: v for k, v in shapes.items() if k in averaged}, "ema") if averaged else {}
        source = f"{SHARDED_DIR}/ema" if averaged else f"{SHARDED_DIR}/model"
    else:
        state, source = {}, MODEL_FILE
        if ema and (checkpoint / EMA_FILE).is_file():
            state, source = ckpt.load_tensors(checkpoint / EMA_FILE), EMA_FILE
        elif not (checkpoint / MODEL_FILE).is_file():
            raise InputNotFound(f"{checkpoint}: no {MODEL_FILE} or {SHARDED_DIR}/ (incomplete or foreign checkpoint)")
    rest = {k: v for k, v in shapes.items() if k not in state}
    if rest:  # no EMA, or an EMA of the trained parameters only
        raw = read_sharded(checkpoint, rest, "model") if sharded else ckpt.load_tensors(checkpoint / MODEL_FILE)
        state = {**{k: v for k, v in raw.items() if k in rest or k not in shapes}, **state}
        if source in (EMA_FILE, f"{SHARDED_DIR}/ema"):
            source += " (frozen parameters from the raw weights)"
    return state, source


class RunProgress:
    """The run's counters (state.json): steps taken, skipped steps, tokens and training time so far, and the
    VAE its latents belong to."""

    def __init__(self, world_size: int, vae: str | None, clock: Callable[[], float] = time.time) -> None:
        self.world_size = world_size
        self.vae = vae
        self.clock = clock
        self.step = 0
        self.skipped_steps = 0
        self.bad_in_a_row = 0
        self.tokens_seen = 0
        self.train_time = 0.0  # seconds spent in training steps (no evaluation, no checkpointing)

    def state_dict(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "skipped_steps": self.skipped_steps, "bad_in_a_row": self.bad_in_a_row,
                "tokens_seen": self.tokens_seen, "time": self.clock(), "train_time_s": self.train_time, "vae": self.vae}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.bad_in_a_row = int(state.get("bad_in_a_row", 0))
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.train_time = float(state.get("train_time_s", 0.0))


@dataclass
class TrainingState:
    """Everything a training checkpoint holds: the model, its optimizer and EMA (shared by every process), and
    this process's own stream of micro-batches (`data`: a `ResumableStream`), its noise generator and the
    global RNG of `device`; `progress` goes into state.json."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    ema: Any
    data: Any
    noise: torch.Generator
    device: torch.device
    progress: RunProgress


class TrainingCheckpointer:
    """Saves and resumes a `TrainingState` in RUN/checkpoints/ in the layout the number of processes calls
    for (module docstring); resumes from either layout on any number of processes."""

    def __init__(self, run: RunDir, state: TrainingState, dist: DistInfo, keep: int, seed: int) -> None:
        self.state, self.dist, self.seed = state, dist, seed
        self.per_rank = Bundle(data=state.data, noise=GeneratorState(state.noise), rng=TorchRNGState(state.device))
        self.checkpointer = Checkpointer(
            run.checkpoints_dir, {**self._weights(dist.distributed), RANK_FILE: self.per_rank}, keep=keep,
            progress=state.progress, metadata={"format": CHECKPOINT_FORMAT}, rank=dist.rank, is_main=dist.is_main,
            any_rank=lambda flag: any_rank(flag, dist), barrier=lambda: barrier(dist))

    def _weights(self, sharded: bool) -> dict[str, Any]:
        s = self.state
        if sharded:
            return {SHARDED_DIR: ShardedWeights(s.model, s.optimizer, s.ema)}
        parts: dict[str, Any] = {MODEL_FILE: ModuleWeights(s.model)}
        if s.ema is not None:
            parts[EMA_FILE] = s.ema
        parts[OPTIMIZER_FILE] = OptimizerState(s.model, s.optimizer)
        return parts

    def latest(self) -> Path | None:
        return self.checkpointer.latest()

    def save(self, step: int) -> Path:
        """Checkpoint `step` (every process calls it); CheckpointSaveError leaves earlier checkpoints intact."""
        self.state.progress.step = step
        return self.checkpointer.save(step)

    def load(self, checkpoint: Path, verify: bool = True) -> None:
        """Resume. Same number of processes: every part as saved (bit-exact). Another number: weights, EMA,
        optimizer and counters as saved; each process's data position re-split from all the saved ones (a
        few samples seen twice, none skipped) and its random streams re-seeded."""
        checkpoint = Path(checkpoint)
        weights = self._weights(sharded=(checkpoint / SHARDED_DIR).is_dir())
        saved_world = int(ckpt.read_state(checkpoint)["world_size"])
        dist = self.dist
        if saved_world == dist.world_size:
            self.checkpointer.load(checkpoint, parts={**weights, RANK_FILE: self.per_rank}, verify=verify)
            return
        self.checkpointer.load(checkpoint, parts=weights, verify=verify)
        old = [self.checkpointer.read_part(checkpoint, RANK_FILE.format(rank=k))["data"] for k in range(saved_world)]
        seed = resplit_seed(self.seed, dist.rank, dist.world_size, self.state.progress.step)
        self.state.data.load_resplit(old, Resplit(saved_world, seed))
        self.state.noise.manual_seed(seed + 1)
        torch.manual_seed(seed + 2)  # the CPU and CUDA generators
        if dist.is_main:
            print(f"note: {checkpoint} was written by {saved_world} processes, resuming on {dist.world_size}: the "
                  "data position is re-split and random streams re-seeded, so this run is not bit-identical to "
                  f"one on {saved_world} processes", flush=True)


def resplit_seed(seed: int, rank: int, world_size: int, step: int) -> int:
    """A seed for process `rank` of `world_size` resuming at `step` after a change of process count."""
    return (int(seed) * 1_000_003 + world_size * 10_007 + rank) * 7_919 + int(step)


__all__ = ["CHECKPOINT_FORMAT", "CheckpointSaveError", "OptimizerState", "RunDir", "RunProgress", "ShardedWeights",
           "TrainingCheckpointer", "TrainingState", "load_inference_weights", "resplit_seed"]
