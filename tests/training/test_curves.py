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
