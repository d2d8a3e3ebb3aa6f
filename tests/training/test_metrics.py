"""What a run reports: metrics.jsonl with TensorBoard events, lines after a resumed step dropped, and the
held-out summary (last evaluation, best image loss)."""

import json

import pytest

from transfusion_mot.common.errors import InputNotFound
from transfusion_mot.training.metrics import MetricsLogger, read_metrics, validation_summary


def test_logger_writes_jsonl_and_tensorboard(tmp_path):
    logger = MetricsLogger(tmp_path, 0, enabled=True, tensorboard=True)
    for step in (1, 2, 3):
        logger.log({"step": step, "loss": 1.0 / step, "val_image_loss": 0.5, "mfu": None})
    logger.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert read_metrics(tmp_path)[0]["mfu"] is None  # no peak known: null in the file, no TensorBoard curve
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"train/loss", "val/image_loss"}
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]


def test_resume_drops_lines_after_the_checkpoint(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (10, 20, 30)))
    MetricsLogger(tmp_path, 20, enabled=True, tensorboard=False).close()  # resumed from step 20
    assert [r["step"] for r in read_metrics(tmp_path)] == [10, 20]
    MetricsLogger(tmp_path, 0, enabled=False, tensorboard=False).log({"step": 1})  # other ranks write nothing
    assert [r["step"] for r in read_metrics(tmp_path)] == [10, 20]
    with pytest.raises(InputNotFound, match="no metrics.jsonl"):
        read_metrics(tmp_path / "nothing")


def test_validation_summary_has_the_last_and_the_best(tmp_path):
    rows = [{"step": 5, "loss": 1.0}, {"step": 10, "val_image_loss": 0.4, "val_text_loss": 2.0, "loss": 0.9},
            {"step": 20, "val_image_loss": 0.3, "val_text_loss": 1.9}, {"step": 30, "val_image_loss": 0.35}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = validation_summary(tmp_path, "val-cache", 64, 1234, 10, ["t0-250"])
    assert summary["evaluations"] == 3 and summary["final"] == {"step": 30, "val_image_loss": 0.35}
    assert summary["best_image_loss"] == {"step": 20, "val_image_loss": 0.3}
    assert summary["source"] == "val-cache" and summary["samples"] == 64 and summary["draw_seed"] == 1234
