"""What a run reports: metrics.jsonl (one JSON object per logged step) with TensorBoard events beside it,
and summary.json (parameters, FLOPs, status, times, held-out results)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..common.errors import InputNotFound
from ..common.files import read_jsonl, write_json, write_jsonl


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of RUN/metrics.jsonl (one JSON object per logged step), in order."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise InputNotFound(f"{run_dir}: no metrics.jsonl (not a training run directory)")
    return read_jsonl(path)


class MetricsLogger:
    """metrics.jsonl and TensorBoard events (`train/...`, `val/...`), on the main process only.

    On resume, lines logged after the resumed checkpoint are dropped: those steps are run again."""

    def __init__(self, run_dir: Path, start_step: int, enabled: bool, tensorboard: bool) -> None:
        self.enabled = enabled
        self.writer = None
        self.file = None
        if not enabled:
            return
        path = run_dir / "metrics.jsonl"
        if path.exists():
            write_jsonl(path, [r for r in read_jsonl(path) if r.get("step", 0) <= start_step])
        self.file = path.open("a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and value is not None:  # val_image_loss -> val/image_loss; mfu without a peak
                    tag = f"val/{key[len('val_'):]}" if key.startswith("val_") else f"train/{key}"
                    self.writer.add_scalar(tag, value, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


def validation_summary(run_dir: Path, source: str, samples: int, seed: int, every: int,
                       buckets: list[str]) -> dict[str, Any]:
    """Where the held-out set came from, the last evaluation and the best image loss of the whole run
    (read back from metrics.jsonl, so a resumed run includes evaluations from before the resume)."""
    evals = [{k: v for k, v in r.items() if k == "step" or k.startswith("val_")} for r in read_metrics(run_dir)
             if "val_image_loss" in r]
    best = min(evals, key=lambda r: r["val_image_loss"]) if evals else None
    summary = {"source": source, "samples": samples, "draw_seed": seed, "every": every, "timestep_buckets": buckets,
               "evaluations": len(evals), "final": evals[-1] if evals else None,
               "best_image_loss": {"step": best["step"], "val_image_loss": best["val_image_loss"]} if best else None}
    corpus = [r for r in evals if "val_corpus_loss" in r]
    if corpus:  # held-out text documents: loss per token and perplexity before training and at the end
        first, last = corpus[0], corpus[-1]
        summary["corpus"] = {"first": {"step": first["step"], "val_corpus_loss": first["val_corpus_loss"],
                                       "perplexity": math.exp(first["val_corpus_loss"])},
                             "final": {"step": last["step"], "val_corpus_loss": last["val_corpus_loss"],
                                       "perplexity": math.exp(last["val_corpus_loss"])}}
    return summary


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    write_json(Path(run_dir) / "summary.json", summary)


__all__ = ["MetricsLogger", "read_metrics", "validation_summary", "write_summary"]
