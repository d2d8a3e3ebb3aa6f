"""Loss curves of training runs as one PNG (matplotlib), read from their metrics.jsonl.

One panel per (title, metric keys); one line per run and key (records from `metrics.read_metrics`), against
optimizer steps and, when asked, against training wall time (`train_time_s`: seconds spent in training
steps, without evaluation or checkpointing), so runs of different speed are compared at equal compute time
as well as equal steps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# x axes: metrics.jsonl key -> axis label
X_AXES = {"step": "step", "train_time_s": "training time (s)"}
VALIDATION_PANELS = (("held-out image loss", ("val_image_loss",)), ("held-out text loss", ("val_text_loss",)))
TRAINING_PANELS = (("image loss", ("image_loss", "val_image_loss")), ("text loss", ("text_loss", "val_text_loss")))
RUN_PANELS = TRAINING_PANELS + (("learning rate", ("lr",)),)


def plot_curves(runs: Mapping[str, Sequence[Mapping[str, Any]]], out: str | Path,
                panels: Sequence[tuple[str, Sequence[str]]] = VALIDATION_PANELS,
                x_axes: Sequence[str] = ("step", "train_time_s"), title: str | None = None,
                log_y: bool = True) -> Path:
    """Write a grid of panels (rows) x x-axes (columns) to `out`; returns the path.

    runs: name -> metric records (`read_metrics`); a key a record lacks is skipped for that record, so
    validation keys (logged every eval_every steps) and training keys (every log_every) share a panel."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    unknown = [x for x in x_axes if x not in X_AXES]
    if unknown:
        raise ValueError(f"unknown x axis {unknown[0]!r}; choose from {list(X_AXES)}")
    fig, axes = plt.subplots(len(panels), len(x_axes), figsize=(5.2 * len(x_axes), 3.4 * len(panels)), squeeze=False)
    for row, (panel_title, keys) in enumerate(panels):
        for col, x_key in enumerate(x_axes):
            ax = axes[row][col]
            for run_index, (run_name, records) in enumerate(runs.items()):
                colour = f"C{run_index % 10}"  # one colour per run; training lines faint, held-out ones marked
                for key in keys:
                    points = [(r[x_key], r[key]) for r in records if x_key in r and key in r]
                    if not points:
                        continue
                    label = run_name if len(keys) == 1 else f"{run_name} {key}"
                    style = "-o" if key.startswith("val_") and len(points) < 40 else "-"
                    ax.plot(*zip(*points), style, label=label, markersize=3, linewidth=1.2, color=colour,
                            alpha=0.45 if not key.startswith("val_") and len(keys) > 1 else 1.0)
            ax.set_xlabel(X_AXES[x_key])
            ax.set_title(panel_title)
            if log_y:
                ax.set_yscale("log")
            ax.grid(True, alpha=0.3)
            if ax.has_data():
                ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def run_names(run_dirs: Sequence[str | Path]) -> list[str]:
    """Short distinct names for run directories: the directory name, with parents added where two clash."""
    paths = [Path(p).resolve() for p in run_dirs]
    depth = 1
    while True:
        names = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(names)) == len(names) or depth > max(len(p.parts) for p in paths):
            return names
        depth += 1


def plot_runs(run_dirs: Sequence[str | Path], out: str | Path, x: str = "both") -> Path:
    """`tmot plot`: training and held-out image and text losses and the learning rate of several runs,
    overlaid and named, against steps, training time or both (`x`: step | time | both)."""
    from ..common.errors import InvalidInput
    from ..run_dir import RunDir

    axes = {"step": ("step",), "time": ("train_time_s",), "both": ("step", "train_time_s")}
    if x not in axes:
        raise InvalidInput(f"x axis {x!r}: choose step, time or both")
    if not run_dirs:
        raise InvalidInput("no run directories to plot")
    dirs = [RunDir(d) for d in run_dirs]
    runs = {name: run.read_metrics() for name, run in zip(run_names(run_dirs), dirs)}
    empty = [name for name, records in runs.items() if not records]
    if empty:
        raise InvalidInput(f"{empty[0]}: {dirs[0].metrics_file.name} has no records yet")
    return plot_curves(runs, out, panels=RUN_PANELS, x_axes=axes[x], title=", ".join(runs))
