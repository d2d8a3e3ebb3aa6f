"""`tmot train`: prepare a run from its config, build its trainer, train, report.

In order: join the process group (torchrun); prepare what the run needs before its trainer (the built-in
data set, the tokenizer, the run directory: `recipes.prepare.prepare_run`); the trainer builds its parts from
the config's sections (`training.trainer.Trainer`) and trains; summary.json records the run.
"""

from __future__ import annotations

from pathlib import Path

from ..common.distributed import DistInfo, init_distributed, shutdown_distributed
from ..common.errors import TrainingError
from ..config import RunConfig
from ..run_dir import RunDir
from ..training.trainer import Trainer, TrainResult
from .prepare import prepare_run


def build_trainer(config: RunConfig, run_dir: str | Path, resume: bool = False, dist: DistInfo | None = None
                  ) -> Trainer:
    """The trainer of `config` in `run_dir`, prepared (and, `resume`, at its last intact checkpoint), ready to
    `fit`; `dist`: this process's place in a process group (default: a single process)."""
    run, dist = RunDir(run_dir), dist or DistInfo()
    tokenizer, resume_from = prepare_run(config, run, resume, dist)
    return Trainer(config, run, dist, tokenizer, resume_from)


def train(config: RunConfig, run_dir: str | Path, resume: bool = False) -> TrainResult:
    """Train (or, `resume`, continue) the run of `config` in `run_dir`; the Python entry point behind `tmot
    train` (one process, or each process of a torchrun)."""
    dist = init_distributed(config.train.device)
    try:
        trainer = build_trainer(config, run_dir, resume, dist)
        result = trainer.fit()
        if dist.is_main:
            result.summary = trainer.summary(result)
            trainer.run.write_summary(result.summary)
        if result.status == "diverged":
            raise TrainingError(f"{trainer.progress.bad_in_a_row} consecutive steps had a non-finite loss or gradient "
                                f"(step {result.step}); stopped. The last good checkpoint is "
                                f"{result.checkpoint or '(none yet)'}; lower optim.lr or check the data, then --resume")
        return result
    finally:
        shutdown_distributed()


__all__ = ["build_trainer", "train"]
