"""Shapes alignment: the judging rules, deterministic training, save/load, and scores that move the
right way on correct and deliberately wrong renders."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from eval.align import (
    ClassifierNotFound,
    ShapesClassifier,
    judge,
    position_holds,
    relations_between,
    score_alignment,
    train_shapes_classifier,
)
from transfusion_mot.data.shapes import (
    COLOURS,
    parse_caption,
    render_shapes,
    sample_scene,
)


@pytest.fixture(scope="module")
def classifier():
    """A quick classifier (~10 s on one core): good enough to tell right renders from wrong ones;
    the full budget (tmot eval align train) is what reaches >= 98%."""
    return train_shapes_classifier(None, steps=150, batch_size=64, lr=6e-3, eval_images=0)


def renders(n: int, seed: int, wrong_colour: bool = False) -> tuple[list[np.ndarray], list[str]]:
    rng, colour_rng = random.Random(seed), random.Random(-seed)
    images, captions = [], []
    for _ in range(n):
        scene = sample_scene(rng, 32)
        objects = scene["objects"]
        if wrong_colour:
            objects = [{**o, "colour": colour_rng.choice([c for c in COLOURS if c != o["colour"]])} for o in objects]
        images.append(np.asarray(render_shapes(objects, 32)))
        captions.append(scene["text"])
    return images, captions


def obj(colour, shape, size, x, y, score=0.9):
    return {"colour": colour, "shape": shape, "size": size, "score": score, "center_fraction": [x, y]}


def test_judge_rules():
    cap = parse_caption("a small red circle above a large blue square")
    good = [obj("blue", "square", "large", 0.5, 0.7), obj("red", "circle", "small", 0.45, 0.2)]
    assert judge(good, cap) == {"count": True, "colour": True, "shape": True, "size": True, "position": True,
                                "all_correct": True}
    flipped = [obj("blue", "square", "large", 0.5, 0.2), obj("red", "circle", "small", 0.5, 0.7)]
    assert judge(flipped, cap)["position"] is False and judge(flipped, cap)["colour"] is True
    swapped = [obj("red", "square", "large", 0.5, 0.7), obj("blue", "circle", "small", 0.5, 0.2)]  # binding swapped
    verdict = judge(swapped, cap)
    assert verdict["colour"] is False and verdict["all_correct"] is False
    extra = [*good, obj("green", "cross", "small", 0.9, 0.9, score=0.6)]
    assert judge(extra, cap)["count"] is False and judge(extra, cap)["colour"] is True
    assert judge(good[:1], cap)["colour"] is False  # a missing object fails every attribute
    single = parse_caption("a large green triangle on the left")
    assert judge([obj("green", "triangle", "large", 0.25, 0.5)], single)["all_correct"] is True
    assert judge([obj("green", "triangle", "large", 0.75, 0.5)], single)["position"] is False
    plain = parse_caption("a small white cross")
    assert judge([obj("white", "cross", "small", 0.9, 0.1)], plain)["position"] is None


def test_position_and_relation_rules_accept_every_ground_truth():
    rng = random.Random(1)
    for _ in range(2000):
        scene = sample_scene(rng, 32)
        centres = [[c / 32 for c in o["center"]] for o in scene["objects"]]
        if scene["relation"]:
            assert scene["relation"] in relations_between(centres[0], centres[1])
        if scene["position"]:
            assert position_holds(centres[0], scene["position"])


def test_training_is_deterministic():
    a = train_shapes_classifier(None, steps=3, batch_size=16, eval_images=0, seed=7)
    b = train_shapes_classifier(None, steps=3, batch_size=16, eval_images=0, seed=7)
    c = train_shapes_classifier(None, steps=3, batch_size=16, eval_images=0, seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_a_killed_training_resumes_exactly(tmp_path, monkeypatch):
    """The classifier's loop uses the shared checkpointer: killed during step 5 of 6 (checkpoints every 2
    steps), then resumed, it ends with the weights of a run that never stopped."""
    import eval.align as align

    straight = train_shapes_classifier(None, steps=6, batch_size=8, eval_images=0, seed=3)
    real, calls = align.render_batch, {"n": 0}

    def killed_at_step_5(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(align, "render_batch", killed_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train_shapes_classifier(tmp_path / "clf", steps=6, batch_size=8, eval_images=0, seed=3, save_every=2)
    assert sorted(p.name for p in (tmp_path / "clf" / "checkpoints").iterdir()) == ["step_4"]
    monkeypatch.setattr(align, "render_batch", real)
    resumed = train_shapes_classifier(tmp_path / "clf", steps=6, batch_size=8, eval_images=0, seed=3, save_every=2,
                                      resume=True)
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "clf" / "config.json").is_file()


def test_save_load_round_trip(classifier, tmp_path):
    classifier.save_pretrained(tmp_path / "clf")
    assert {p.name for p in (tmp_path / "clf").iterdir()} == {"config.json", "model.safetensors"}
    loaded = ShapesClassifier.from_pretrained(tmp_path / "clf")
    images, _ = renders(16, seed=5)
    x = classifier.prepare(images)
    with torch.no_grad():
        assert all(torch.equal(classifier.eval()(x)[k], loaded(x)[k]) for k in ("objectness", "colour", "offset"))
    assert classifier.detect(images) == loaded.detect(images)
    assert loaded.metrics == classifier.metrics
    with pytest.raises(ClassifierNotFound, match="align train"):
        ShapesClassifier.from_pretrained(tmp_path / "nothing")


def test_correct_renders_score_high_and_wrong_colours_low(classifier):
    images, captions = renders(80, seed=123)
    right = score_alignment(classifier, images, captions)
    assert right["n_scored"] == 80 and right["n_unparsed"] == 0
    assert right["all_correct"] >= 0.8 and right["colour"] >= 0.85
    tasks = right["by_task"]
    assert set(tasks) == {"single_object", "single_object_position", "two_objects_relation"}
    assert sum(t["n"] for t in tasks.values()) == 80
    wrong_images, wrong_captions = renders(80, seed=123, wrong_colour=True)
    assert wrong_captions == captions
    wrong = score_alignment(classifier, wrong_images, captions)
    assert wrong["colour"] <= 0.1 and wrong["all_correct"] <= 0.1
    assert wrong["shape"] >= 0.7  # only the colour was broken


def test_other_prompts_and_sizes(classifier):
    images, captions = renders(4, seed=9)
    big = [np.asarray(render_shapes(sample_scene(random.Random(2), 64)["objects"], 64))]
    result = score_alignment(classifier, images + big, [*captions, "a photo of a cat"], details=True)
    assert result["n_unparsed"] == 1 and result["n_scored"] == 4 and len(result["per_image"]) == 4
    assert classifier.prepare(big).shape == (1, 3, 32, 32)  # other sizes are resized to the trained one
    with pytest.raises(ValueError, match="prompts"):
        score_alignment(classifier, images, captions[:2])
