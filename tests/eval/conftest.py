"""Fixtures of the evaluation tests: a tiny CLIP saved like a real one, and rendered shapes scenes."""

import random

import numpy as np
import pytest
from helpers import make_tiny_clip

from transfusion_mot.data.shapes import render_shapes, sample_scene


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture(scope="module")
def scenes():
    rng = random.Random(0)
    items = [sample_scene(rng, 32) for _ in range(6)]
    return [np.asarray(render_shapes(s["objects"], 32)) for s in items], [s["text"] for s in items]
