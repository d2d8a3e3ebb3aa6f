"""`tmot train`: prepare a run from its config, build its trainer, train, report.

In order: prepare what the run needs before its trainer (the process group, the built-in data set, the
tokenizer, the run directory: `recipes.prepare.prepare_run`); the trainer builds its parts from the config's
sections (`training.trainer.Trainer`), trains, and records the run's summary.
"""

from __future__ import annotations

import copy
from pathlib import Path

from ..common.distributed import shutdown_distributed
from ..common.errors import TrainingError
from ..config import RunConfig
from ..run_dir import RunDir
from ..training.trainer import Trainer, TrainResult
from .prepare import prepare_run


def build_trainer(config: RunConfig, run_dir: str | Path, resume: bool = False) -> Trainer:
    """The trainer of `config` in `run_dir`, prepared (and, `resume`, at its last intact checkpoint), ready to
    `fit`. Joins the process group torchrun describes, if any. `config` is left as it is: the run's own copy,
    with its data, tokenizer and model size filled in, is `trainer.config` (and RUN/config.yaml)."""
    config = copy.deepcopy(config)
    prepared = prepare_run(config, RunDir(run_dir), resume)
    return Trainer(config, prepared)


def train(config: RunConfig, run_dir: str | Path, resume: bool = False) -> TrainResult:
    """Train (or, `resume`, continue) the run of `config` in `run_dir`; the Python entry point behind `tmot
    train` (one process, or each process of a torchrun)."""
    try:
        trainer = build_trainer(config, run_dir, resume)
        result = trainer.fit()
    finally:
        shutdown_distributed()
    if result.status == "diverged":
        raise TrainingError(f"{trainer.progress.bad_in_a_row} consecutive steps had a non-finite loss or gradient "
                            f"(step {result.step}); stopped. The last good checkpoint is "
                            f"{result.checkpoint or '(none yet)'}; lower optim.lr or check the data, then --resume")
    return result


__all__ = ["build_trainer", "train"]
