"""Loss curves: a PNG with one panel per metric and axis, lines per run, validation points marked."""

import pytest
from PIL import Image

from transfusion_mot.training.curves import TRAINING_PANELS, plot_curves


def records(scale: float):
    return [{"step": s, "train_time_s": 0.1 * s, "loss": scale / s, "image_loss": scale / s, "text_loss": 1.0,
             **({"val_image_loss": scale / s, "val_text_loss": 1.1} if s % 5 == 0 else {})} for s in range(1, 21)]


def test_plot_curves_writes_a_grid_of_panels(tmp_path):
    out = plot_curves({"mot": records(1.0), "dense": records(1.2)}, tmp_path / "c" / "curves.png", title="t")
    two_by_two = Image.open(out).size
    one_axis = Image.open(plot_curves({"mot": records(1.0)}, tmp_path / "one.png", x_axes=("step",),
                                      panels=TRAINING_PANELS[:1])).size
    assert two_by_two[0] > 1.8 * one_axis[0] and two_by_two[1] > 1.8 * one_axis[1]  # (2 panels x 2 axes) vs (1 x 1)
    with pytest.raises(ValueError, match="unknown x axis 'epoch'"):
        plot_curves({"mot": records(1.0)}, tmp_path / "x.png", x_axes=("epoch",))


def test_plot_runs_overlays_several_runs_with_their_names(tmp_path, monkeypatch, capsys):
    import json

    import matplotlib.figure

    from transfusion_mot.cli import main
    from transfusion_mot.training.curves import plot_runs, run_names

    dirs = [tmp_path / "runs" / "mot", tmp_path / "runs" / "dense", tmp_path / "other" / "mot"]
    for d, scale in zip(dirs, (1.0, 1.2, 0.9)):
        d.mkdir(parents=True)
        (d / "metrics.jsonl").write_text("".join(json.dumps({**r, "lr": 1e-3}) + "\n" for r in records(scale)))
    assert run_names(dirs) == ["runs/mot", "runs/dense", "other/mot"]
    assert run_names(dirs[:2]) == ["mot", "dense"]
    figures = []
    real = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: (figures.append(fig), real(fig, *a, **k)))
    out = plot_runs(dirs[:2], tmp_path / "curves.png")
    assert Image.open(out).size[0] > 500
    legends = {t.get_text() for ax in figures[0].axes if ax.get_legend() for t in ax.get_legend().get_texts()}
    assert {"mot image_loss", "dense image_loss", "mot val_text_loss", "dense val_text_loss", "mot", "dense"} <= legends
    assert [ax.get_title() for ax in figures[0].axes][::2] == ["image loss", "text loss", "learning rate"]
    assert main(["plot", str(dirs[0]), str(tmp_path / "empty"), "--out", str(tmp_path / "x.png")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no metrics.jsonl" in err[0]
