"""CLIP score on a tiny CLIP saved and loaded like a real one, equal to a hand computation."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from helpers import write_captioned

from eval.clip import (
    ClipModelNotFound,
    _as_embedding,
    clip_score,
    load_clip,
)


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








