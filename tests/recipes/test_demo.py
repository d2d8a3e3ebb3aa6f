"""The end-to-end demo, at toy sizes: every stage runs, the report is written, and a re-run reuses it all."""

import json

from transfusion_mot.data.shapes import parse_caption
from transfusion_mot.recipes.demo import DEMO_PROMPTS, RELATION_PROMPTS, heldout_prompts, run_demo


def test_heldout_prompts_are_other_prompts_and_valid_captions():
    sets = heldout_prompts()
    assert list(sets) == ["small objects", "single object with a position", "two objects with a relation",
                          "demo prompts, other seeds"]
    assert sets.pop("demo prompts, other seeds") == DEMO_PROMPTS  # held out by its seeds only
    for prompts in sets.values():
        assert len(prompts) == 32 and not set(prompts) & set(DEMO_PROMPTS)
        for p in prompts:
            parse_caption(p)  # every held-out prompt is scoreable by the classifier
    assert all(parse_caption(p)["position"] for p in sets["single object with a position"])
    assert all(parse_caption(p)["relation"] for p in sets["two objects with a relation"])
    assert {k: v for k, v in heldout_prompts().items() if k in sets} == sets  # fixed by the seed
    assert heldout_prompts(seed=2)["two objects with a relation"] != sets["two objects with a relation"]


def test_demo_pipeline_end_to_end_and_reuse(tmp_path):
    # a VAE trained here (3 steps), the shipped shapes classifier (tests/vae/test_shipped.py: the shipped VAE)
    kwargs = dict(num_images=200, vae_steps=3, train_steps=4, classifier_steps=None, images_per_prompt=1,
                  sample_steps=2, fid_images=0, eval_every=2, progress=False, log=lambda *a: None)
    report = run_demo(tmp_path / "demo", **kwargs)
    out = tmp_path / "demo"
    for name in ("samples.png", "curves.png", "report.md", "report.json"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "report.json").read_text())
    assert saved["train"]["steps"] == 4 and saved["fid"] == {"skipped": "disabled (--fid-images 0)"}
    assert set(saved["train"]["validation"]) >= {"val_image_loss", "val_text_loss", "val_caption_loss"}
    demo = saved["alignment"]["demo prompts (every colour x shape)"]
    assert demo["n_scored"] == len(DEMO_PROMPTS)
    for name in ("held out: small objects", "held out: single object with a position",
                 "held out: two objects with a relation", "real val images (reference)"):
        assert saved["alignment"][name]["n_scored"] > 0, name
    for key in ("colour", "shape", "all_correct"):
        assert 0.0 <= demo[key] <= 1.0
    # the run directory keeps the headline numbers, which an export's model card states
    evaluation = json.loads((out / "run" / "evaluation.json").read_text())
    assert evaluation["alignment demo prompts (every colour x shape): all_correct"] == demo["all_correct"]
    assert not any("reference" in key or "ceiling" in key for key in evaluation)
    assert evaluation["sampling"] == "2 steps, CFG 5.0 with guidance rescale 0.7, EMA weights"
    manifest = json.loads((out / "samples" / "manifest.json").read_text())
    # the demo prompts once (images_per_prompt=1), then every held-out prompt twice with its own seeds
    assert manifest["guidance_rescale"] == 0.7
    assert manifest["scheduler"] == "flow" and len(manifest["images"]) == len(DEMO_PROMPTS) + 2 * (3 * 32 + 32)
    assert {row["set"] for row in manifest["images"]} == set(saved["alignment"]) - {
        "real val images (reference)", "real val images through the VAE (ceiling)"}
    seeds = [row["seed"] for row in manifest["images"]]
    assert len(set(seeds)) == len(seeds)  # held-out prompts use other seeds than the demo prompts
    text = (out / "report.md").read_text()
    assert "VAE trained here (3 steps), shapes classifier shipped with the package" in text
    assert "![samples](samples.png)" in text and "![curves](curves.png)" in text and "## Alignment" in text
    assert report["stages"]["train"]["reused"] is False
    again = run_demo(out, **kwargs)
    assert again["stages"]["data_vae_latents"]["reused"] == ["data", "vae", "latents", "latents-val"]
    assert again["stages"]["train"]["reused"] is True and again["stages"]["align"]["classifier"] == "shipped"
    assert again["alignment"] == report["alignment"]  # same seeds, same images
    assert len(RELATION_PROMPTS) == 4


def test_demo_uses_the_shipped_vae_unless_told_to_train_one():
    from transfusion_mot.recipes.demo import demo_config

    shipped = demo_config(10, 0, False, 5, 100, None)
    assert shipped.data.builtin_vae == "shipped"
    trained = demo_config(10, 0, False, 5, 100, 7)
    assert (trained.data.builtin_vae, trained.data.builtin_vae_steps) == ("train", 7)


def test_demo_trains_the_recipe_s_steps_by_default(monkeypatch, tmp_path):
    """`run_demo()` with no train_steps takes configs/train/shapes-tiny.yaml's, and its held-out cadence from them."""
    from transfusion_mot.config import load_run_config
    from transfusion_mot.recipes import demo

    asked = {}
    build = demo.demo_config

    def record(*args):
        config = build(*args)
        asked.update(steps=config.train.max_steps, eval_every=config.train.eval_every)
        raise RuntimeError("stop before any work")

    monkeypatch.setattr(demo, "demo_config", record)
    try:
        demo.run_demo(tmp_path / "demo", progress=False, log=lambda *a: None)
    except RuntimeError as error:
        assert str(error) == "stop before any work"
    recipe_steps = load_run_config("shapes-tiny").train.max_steps
    assert asked == {"steps": recipe_steps, "eval_every": recipe_steps // 10}


def test_a_demo_folder_of_another_recipe_is_refused_with_what_differs(tmp_path):
    """Re-running the demo where another recipe trained (an older release's, other flags) names the difference and
    the way out, instead of the trainer's --resume message or sampling a longer run than asked."""
    import pytest

    from transfusion_mot.common.errors import ConfigError

    kwargs = {"num_images": 100, "vae_steps": 2, "train_steps": 2, "images_per_prompt": 1, "sample_steps": 1,
              "fid_images": 0, "eval_every": 0, "progress": False, "log": lambda *a: None}
    out = tmp_path / "demo"
    run_demo(out, **kwargs)
    with pytest.raises(ConfigError, match=r"another recipe \(its config differs in \['train.seed'\].*delete .*demo to "
                                          "start over"):
        run_demo(out, **{**kwargs, "seed": 1})
    with pytest.raises(ConfigError, match="it trained 2 steps, more than the 1 asked"):
        run_demo(out, **{**kwargs, "train_steps": 1})
    assert run_demo(out, **kwargs)["stages"]["train"]["reused"] is True  # the same recipe still reuses it
