"""The end-to-end demo, at toy sizes: every stage runs, the report is written, and a re-run reuses it all."""

import json

from transfusion_mot.demo import DEMO_PROMPTS, run_demo


def test_demo_pipeline_end_to_end_and_reuse(tmp_path):
    kwargs = dict(num_images=200, vae_steps=3, train_steps=4, classifier_steps=3, images_per_prompt=1,
                  sample_steps=2, fid_images=0, progress=False, log=lambda *a: None)
    report = run_demo(tmp_path / "demo", **kwargs)
    out = tmp_path / "demo"
    assert (out / "samples.png").is_file() and (out / "report.md").is_file()
    saved = json.loads((out / "report.json").read_text())
    assert saved["train"]["steps"] == 4 and saved["fid"] == {"skipped": "disabled (--fid-images 0)"}
    demo = saved["alignment"]["demo_prompts"]
    assert demo["n_scored"] == len(DEMO_PROMPTS)
    for key in ("colour", "shape", "all_correct"):
        assert 0.0 <= demo[key] <= 1.0
    manifest = json.loads((out / "samples" / "manifest.json").read_text())
    assert manifest["scheduler"] == "ddim" and len(manifest["images"]) == len(DEMO_PROMPTS) + 4
    assert "## Alignment" in (out / "report.md").read_text()
    assert report["stages"]["train"]["reused"] is False
    again = run_demo(out, **kwargs)
    assert again["stages"]["data_vae_latents"]["reused"] == ["data", "vae", "latents"]
    assert again["stages"]["train"]["reused"] is True and again["stages"]["align"]["classifier_reused"] is True
    assert again["alignment"]["demo_prompts"] == report["alignment"]["demo_prompts"]  # same seeds, same images
