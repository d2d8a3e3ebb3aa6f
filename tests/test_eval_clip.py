"""CLIP score and CMMD on a tiny CLIP saved and loaded like a real one; CMMD against plain NumPy."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_eval_support import make_tiny_clip, no_network, write_captioned  # noqa: F401

from eval.clip import (
    ClipModelNotFound,
    _as_embedding,
    clip_score,
    image_embeddings,
    load_clip,
)
from eval.cmmd import compute_cmmd, mmd
from transfusion_mot.data.shapes import render_shapes, sample_scene


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture(scope="module")
def scenes():
    import random

    rng = random.Random(0)
    items = [sample_scene(rng, 32) for _ in range(6)]
    return [np.asarray(render_shapes(s["objects"], 32)) for s in items], [s["text"] for s in items]


def test_clip_score_equals_hand_computation(clip_dir, scenes):
    images, captions = scenes
    result = clip_score(load_clip(clip_dir), images, captions, batch_size=4)
    # by hand: the model's own processor and projection heads, normalise, cosine, x100
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(str(clip_dir)).eval(), CLIPProcessor.from_pretrained(str(clip_dir))
    with torch.no_grad():
        pixels = processor(images=[Image.fromarray(a) for a in images], return_tensors="pt")["pixel_values"]
        tokens = processor(text=captions, return_tensors="pt", padding=True)
        img = model.vision_model(pixel_values=pixels).pooler_output @ model.visual_projection.weight.T
        txt = model.text_model(input_ids=tokens["input_ids"],
                               attention_mask=tokens["attention_mask"]).pooler_output @ model.text_projection.weight.T
    cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    assert result["clip_score"] == pytest.approx(100 * cos.mean().item(), abs=1e-4)
    assert result["clip_cosine"] == pytest.approx(cos.mean().item(), abs=1e-6)
    assert result["scale"] == 100 and result["model"] == str(clip_dir) and result["n"] == 6


def test_feature_outputs_of_both_transformers_generations():
    t = torch.ones(2, 3)
    assert _as_embedding(t, "image") is t  # transformers < 5: a tensor
    assert _as_embedding(SimpleNamespace(pooler_output=t), "image") is t  # >= 5: an output object
    with pytest.raises(TypeError):
        _as_embedding(SimpleNamespace(), "text")


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ClipModelNotFound, match="not found"):
        load_clip(tmp_path / "no-such-dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ClipModelNotFound, match="config.json"):
        load_clip(tmp_path / "empty")
    with pytest.raises(ClipModelNotFound) as info:  # a hub id while offline (HF_HUB_OFFLINE=1, no sockets)
        load_clip("tmot-tests/no-such-clip-model")
    assert "\n" not in str(info.value) and "local directory" in str(info.value)


def test_clip_cli_prints_one_json_object(clip_dir, scenes, tmp_path, capsys):
    from eval.cli import main

    images, captions = scenes
    folder = write_captioned(tmp_path / "gen", images, captions)
    assert main(["clip", "--images", str(folder), "--model", str(clip_dir), "--json", "--device", "cpu"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    result = json.loads(out[0])
    expected = clip_score(load_clip(clip_dir), images, captions)["clip_score"]
    assert result["clip_score"] == pytest.approx(expected, abs=1e-4) and result["skipped"]["count"] == 0
    (folder / "images" / "0002.png").write_bytes(b"corrupt")  # skipped with its caption, and counted
    assert main(["clip", "--images", str(folder), "--model", str(clip_dir), "--json", "--batch-size", "4"]) == 0
    result = json.loads(capsys.readouterr().out)
    expected = clip_score(load_clip(clip_dir), images[:2] + images[3:], captions[:2] + captions[3:])["clip_score"]
    assert result["n"] == 5 and result["skipped"]["count"] == 1 and result["clip_score"] == pytest.approx(expected, abs=1e-4)


def test_cmmd_cli(clip_dir, scenes, tmp_path, capsys):
    from eval.cli import main

    images, captions = scenes
    real = write_captioned(tmp_path / "real", images, captions) / "images"
    fake = write_captioned(tmp_path / "fake", images[::-1], captions) / "images"
    (fake / "junk.png").write_bytes(b"")
    assert main(["cmmd", "--real", str(real), "--fake", str(fake), "--clip-model", str(clip_dir), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["cmmd"] == pytest.approx(0.0, abs=1e-6)  # same images, other order
    assert result["n_fake"] == 6 and result["skipped_fake"] == 1


def numpy_mmd(x: np.ndarray, y: np.ndarray, sigma: float = 10.0) -> float:
    """Gretton et al.'s biased MMD² with k(a, b) = exp(-|a - b|² / (2 sigma²)), pair by pair."""
    def k(a, b):
        return np.exp(-((a[:, None, :] - b[None, :, :]) ** 2).sum(-1) / (2 * sigma ** 2))

    return 1000 * (k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean())


def test_mmd_equals_numpy_reference():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 16)) * 3, rng.normal(size=(20, 16)) * 3 + 1.0
    expected = numpy_mmd(x, y)
    assert mmd(x, y) == pytest.approx(expected, rel=1e-10)
    assert mmd(x, y, block=7) == pytest.approx(expected, rel=1e-10)  # row blocks change nothing
    assert mmd(x, x) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError):
        mmd(x, y[:, :3])


def test_cmmd_with_tiny_clip(clip_dir, scenes):
    images, _ = scenes
    bundle = load_clip(clip_dir)
    noise = [np.random.default_rng(i).integers(0, 256, (48, 40, 3), dtype=np.uint8) for i in range(5)]
    result = compute_cmmd(bundle, images, noise)
    real = image_embeddings(bundle, images, squash=True).double().numpy()
    fake = image_embeddings(bundle, noise, squash=True).double().numpy()
    assert np.allclose(np.linalg.norm(real, axis=1), 1.0, atol=1e-5)
    assert result["cmmd"] == pytest.approx(numpy_mmd(real, fake), rel=1e-8)
    assert result["sigma"] == 10 and result["scale"] == 1000 and result["n_fake"] == 5
    assert compute_cmmd(bundle, images, images)["cmmd"] == pytest.approx(0.0, abs=1e-6)
