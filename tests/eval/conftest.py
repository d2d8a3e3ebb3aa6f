"""Fixtures of the evaluation tests: a tiny CLIP and a tiny DINOv2-shaped timm ViT saved like real ones, and
rendered shapes scenes."""

import random

import numpy as np
import pytest
from helpers import make_tiny_clip, make_tiny_timm_vit

from transfusion_mot.data.shapes import render_shapes, sample_scene


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    return make_tiny_timm_vit(tmp_path_factory.mktemp("vit") / "tiny-dinov2")


@pytest.fixture(scope="module")
def vit(vit_dir):
    """The tiny ViT as `--model` names it."""
    return f"local-dir:{vit_dir}"


@pytest.fixture(scope="module")
def scenes():
    rng = random.Random(0)
    items = [sample_scene(rng, 32) for _ in range(6)]
    return [np.asarray(render_shapes(s["objects"], 32)) for s in items], [s["text"] for s in items]
