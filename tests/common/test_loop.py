"""The pieces every training loop shares: the metrics log (JSONL with TensorBoard events, lines after a resumed
step dropped, nothing written by other processes), the progress bar and the stop request."""

import json
import os
import signal

from transfusion_mot.common.files import read_jsonl
from transfusion_mot.common.loop import MetricsLogger, ProgressBar, StopRequest


def test_logger_writes_jsonl_and_tensorboard(tmp_path):
    with MetricsLogger(tmp_path / "metrics.jsonl", 0, tensorboard_dir=tmp_path / "tb") as logger:
        for step in (1, 2, 3):
            logger.log({"step": step, "loss": 1.0 / step, "val_image_loss": 0.5, "mfu": None})
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["mfu"] is None  # no peak known: null in the file, no TensorBoard curve
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"train/loss", "val/image_loss"}
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]


def test_resume_drops_lines_after_the_checkpoint_and_a_new_run_starts_empty(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in (0, 10, 20, 30)))
    MetricsLogger(path, 20).close()  # resumed from step 20
    assert [r["step"] for r in read_jsonl(path)] == [0, 10, 20]
    MetricsLogger(path, 0, enabled=False).log({"step": 1})  # other processes write nothing
    assert [r["step"] for r in read_jsonl(path)] == [0, 10, 20]
    MetricsLogger(path, 0).close()  # a new run in the same place starts from nothing
    assert read_jsonl(path) == []


def test_progress_bar_and_stop_request(capsys):
    with ProgressBar(3, enabled=False) as bar:  # disabled: no tqdm at all
        bar.update(loss="1.0")
        assert bar.bar is None
    with ProgressBar(2, initial=1, desc="x") as bar:
        bar.update(loss="0.5")
        assert bar.bar.n == 2
    with StopRequest() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)  # handled: the loop finishes its step, then stops
        assert stop.requested and stop.signal == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is not stop._handle  # the previous handler is back
