"""The pieces every training loop of the project shares (the MoT trainer, the VAE, the shapes classifier),
besides the checkpointer (`common.checkpoint`) and the learning-rate schedule (`common.schedule`): the metrics
log (JSONL, with TensorBoard events beside it), the progress bar, and a graceful stop on SIGTERM / Ctrl-C."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

from .files import read_jsonl, write_jsonl


class Closing:
    """A resource used as a context manager: leaving the `with` block closes it."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class MetricsLogger(Closing):
    """One JSON object per logged step in a JSONL file and, with `tensorboard_dir`, TensorBoard scalars
    (`train/KEY`, and `val/KEY` for keys that start with val_); `enabled=False` (processes other than the
    main one) writes nothing.

    On resume (`start_step` > 0) lines logged after `start_step` are dropped: those steps are run again."""

    def __init__(self, path: str | Path, start_step: int = 0, enabled: bool = True,
                 tensorboard_dir: str | Path | None = None) -> None:
        self.enabled = enabled
        self.writer = None
        self.file = None
        if not enabled:
            return
        path = Path(path)
        if path.exists():
            write_jsonl(path, [r for r in read_jsonl(path) if r.get("step", 0) <= start_step] if start_step else [])
        self.file = path.open("a")
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(tensorboard_dir), purge_step=start_step + 1 if start_step else None)

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


class ProgressBar(Closing):
    """A tqdm bar over steps, started at the first `update` (nothing at all when disabled: other processes,
    --no-progress)."""

    def __init__(self, total: int, initial: int = 0, desc: str = "train", enabled: bool = True) -> None:
        self.total, self.initial, self.desc, self.enabled = total, initial, desc, enabled
        self.bar = None

    def update(self, **postfix: str) -> None:
        """One step done; `postfix` (name -> formatted value) is shown beside the bar."""
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=self.initial, desc=self.desc, unit="step", dynamic_ncols=True)
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class StopRequest:
    """SIGTERM / SIGINT handler: ask the loop to stop after the current step (a second Ctrl-C aborts)."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers, no graceful stop
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


__all__ = ["MetricsLogger", "ProgressBar", "StopRequest"]
