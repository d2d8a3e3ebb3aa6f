"""Pipeline.from_run / save_pretrained / from_pretrained and the sample, caption and export commands."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from transfusion_mot.cli import main
from transfusion_mot.inference.pipeline import Pipeline, load_pipeline


@pytest.fixture
def run(tiny_run):
    return tiny_run


def test_from_run_uses_ema_and_the_recorded_vae(run):
    pipe = Pipeline.from_run(run)
    assert pipe.info["weights"] == "ema.safetensors" and pipe.info["step"] == 6
    assert pipe.latent_shape == (4, 8, 8) and pipe.image_size == 16
    raw = Pipeline.from_run(run, ema=False, step=3)
    assert raw.info["weights"] == "model.safetensors" and raw.info["step"] == 3
    ema_w = dict(pipe.model.named_parameters())
    assert any(not torch.equal(p, ema_w[n]) for n, p in raw.model.named_parameters())


def test_saved_pipeline_gives_identical_samples_and_captions(run, tmp_path):
    pipe = Pipeline.from_run(run)
    prompts = ["a red square", "a blue square"]
    before = pipe.generate_latents(prompts, seed=3, num_steps=4, cfg_scale=2.0)
    saved = pipe.save_pretrained(tmp_path / "model")
    assert {"pipeline.json", "model_config.yaml", "model.safetensors", "tokenizer", "vae"} <= {p.name for p in saved.iterdir()}
    again = Pipeline.from_pretrained(saved)
    after = again.generate_latents(prompts, seed=3, num_steps=4, cfg_scale=2.0)
    assert torch.equal(before, after)
    images = pipe.decode(before)
    assert [im.size for im in images] == [(16, 16)] * 2
    assert pipe.caption(images, max_new_tokens=5) == again.caption(images, max_new_tokens=5)
    assert load_pipeline(saved).info["source"] == "pretrained"
    with pytest.raises(FileNotFoundError, match="pipeline.json"):
        Pipeline.from_pretrained(tmp_path)


def test_sample_command_writes_images_grid_and_manifest(run, tmp_path, capsys):
    out = tmp_path / "samples"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\n\na green square\n")
    assert main(["sample", "--run", str(run), "--prompts", str(prompts), "--n", "2", "--seed", "5", "--cfg", "2",
                 "--guidance-rescale", "0.5", "--steps", "3", "--out", str(out), "--device", "cpu"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["cfg"] == 2 and manifest["steps"] == 3 and manifest["scheduler"] == "ddpm"
    assert manifest["guidance_rescale"] == 0.5
    assert manifest["compiled"] is False
    assert manifest["checkpoint"].endswith("step_6") and manifest["weights"] == "ema.safetensors"
    assert [r["prompt"] for r in manifest["images"]] == ["a red square"] * 2 + ["a green square"] * 2
    assert [r["seed"] for r in manifest["images"]] == [5, 6, 7, 8]
    assert (out / "grid.png").is_file() and len(list(out.glob("0*.png"))) == 4
    # the files are the pipeline's images for those prompts and seeds (the same batch: a different batch size
    # changes float rounding by ~1e-7, which can flip a pixel by one level)
    pipe = Pipeline.from_run(run)
    expected = pipe.generate(["a red square"] * 2 + ["a green square"] * 2, seed=[5, 6, 7, 8], num_steps=3,
                             cfg_scale=2.0, guidance_rescale=0.5)
    for k, image in enumerate(expected):
        assert np.array_equal(np.asarray(Image.open(out / f"{k:05d}.png").convert("RGB")), np.asarray(image))


@pytest.mark.parametrize("case", ["too_long", "empty_file", "no_prompt", "bad_run", "wrong_scheduler"])
def test_sample_bad_input_is_one_line(run, tmp_path, capsys, case):
    args = ["sample", "--run", str(run), "--out", str(tmp_path / "o"), "--steps", "2"]
    if case == "too_long":
        args += ["--prompt", "x" * 200]
    elif case == "empty_file":
        (tmp_path / "p.txt").write_text("\n \n")
        args += ["--prompts", str(tmp_path / "p.txt")]
    elif case == "bad_run":
        args = ["sample", "--run", str(tmp_path / "nope"), "--prompt", "a", "--out", str(tmp_path / "o")]
    elif case == "wrong_scheduler":
        args += ["--prompt", "a red square", "--scheduler", "flow"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tmot sample: error:") and "\n" not in err
    if case == "too_long":
        assert "max_seq_len" in err


def test_sample_command_compiles_the_blocks_once_and_reports_it(run, tmp_path, capsys, monkeypatch):
    """`tmot sample --compile`: the pipeline's blocks compiled once (traced through AOTAutograd here, without
    inductor's C++ build; the slow test below runs inductor), the eager images, and what compile did in the
    command's output."""
    from transfusion_mot.cli import bench_loader
    from transfusion_mot.common import compile as compile_module
    from transfusion_mot.inference import pipeline as pipeline_module

    calls = []

    def compile_blocks(model):
        calls.append(model)
        compile_module.compile_blocks(model, backend="aot_eager")

    monkeypatch.setattr(pipeline_module, "compile_blocks", compile_blocks)
    pipe = Pipeline.from_run(run)
    assert pipe.compile() is pipe and pipe.compile() is pipe and calls == [pipe.model]  # once
    out = tmp_path / "compiled"
    assert main(["sample", "--run", str(run), "--prompt", "a red square", "--prompt", "a green square", "--seed", "5",
                 "--steps", "3", "--out", str(out), "--device", "cpu", "--compile"]) == 0
    assert len(calls) == 2 and "blocks compiled: " in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["compiled"] is True
    # `tmot eval bench --compile` and `geneval-export --compile` load through the same call
    generate = bench_loader(str(run), "cpu", compiled=True)
    assert len(calls) == 3 and len(generate(["a red square"], 0)) == 1
    bench_loader(str(run), "cpu")
    assert len(calls) == 3
    expected = Pipeline.from_run(run).generate(["a red square", "a green square"], seed=[5, 6], num_steps=3)
    for k, image in enumerate(expected):
        got = np.asarray(Image.open(out / f"{k:05d}.png").convert("RGB")).astype(int)
        assert np.abs(got - np.asarray(image).astype(int)).max() <= 1  # float rounding may move a pixel one level


@pytest.mark.slow
def test_sample_command_compiles_with_inductor(run, tmp_path, capsys):
    """`tmot sample --compile` as users run it: inductor builds the blocks' C++ kernels (tens of seconds on a
    2-core CPU), with no graph break and no frame left eager, and draws the eager images."""
    import torch._dynamo

    from transfusion_mot.common.compile import compile_counts, describe_counts

    torch._dynamo.reset()  # the blocks' code object carries no graphs from earlier tests
    before = compile_counts()
    out = tmp_path / "compiled"
    assert main(["sample", "--run", str(run), "--prompt", "a red square", "--prompt", "a green square", "--seed", "5",
                 "--steps", "3", "--out", str(out), "--device", "cpu", "--compile"]) == 0
    after = compile_counts()
    assert describe_counts(after) in capsys.readouterr().out
    assert after["graphs"] - before["graphs"] == 2  # the caption prefix and the denoising step
    assert (after["graph_breaks"], after["failed"]) == (before["graph_breaks"], before["failed"])
    expected = Pipeline.from_run(run).generate(["a red square", "a green square"], seed=[5, 6], num_steps=3)
    for k, image in enumerate(expected):
        got = np.asarray(Image.open(out / f"{k:05d}.png").convert("RGB")).astype(int)
        assert np.abs(got - np.asarray(image).astype(int)).max() <= 1


def test_caption_and_export_commands(run, tmp_path, capsys):
    img = tmp_path / "x.png"
    Image.new("RGB", (20, 24), (230, 30, 30)).save(img)
    assert main(["caption", "--run", str(run), str(img), "--max-new-tokens", "4", "--json", "--device", "cpu"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["image"] == str(img)
    assert rows[0]["caption"] == Pipeline.from_run(run).caption([img], max_new_tokens=4)[0]
    assert main(["caption", "--run", str(run), str(tmp_path / "missing.png")]) == 2
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "exported")]) == 0
    assert (tmp_path / "exported" / "pipeline.json").is_file()
