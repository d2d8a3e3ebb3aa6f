"""A Chameleon-setting run end to end at toy size: a VQ tokenizer's code cache -> `tmot train` -> Pipeline,
`tmot sample`, export -> from_pretrained, captioning; and data of the other objective refused in one line."""

import json

import numpy as np
import pytest
import torch
from helpers import make_config, make_folder
from PIL import Image

from transfusion_mot.cli import main
from transfusion_mot.inference.pipeline import Pipeline
from transfusion_mot.recipes.train import train

CODEBOOK = 32
TOKENS_MODEL = {"image_objective": "tokens", "codebook_size": CODEBOOK, "max_seq_len": 128}


@pytest.fixture(scope="module")
def codes(tmp_path_factory):
    """24 images of 16 px, a VQ tokenizer of 32 codes (8x8 grids), and their code cache."""
    from vae import VAEConfig, build_vae, encode_folder

    root = tmp_path_factory.mktemp("codes")
    folder = make_folder(root / "images", 24)
    torch.manual_seed(0)
    vq = build_vae(VAEConfig(kind="vq", block_out_channels=[8, 16], norm_num_groups=8, sample_size=16,
                             num_vq_embeddings=CODEBOOK))
    vq.save_pretrained(root / "vq")
    encode_folder(root / "vq", folder, root / "codes", batch_size=8, progress=False)
    return {"folder": folder, "vae": root / "vq", "latents": root / "codes"}


@pytest.fixture(scope="module")
def run(codes, tmp_path_factory):
    out = tmp_path_factory.mktemp("chameleon") / "run"
    train(make_config(codes, model=TOKENS_MODEL, train={"max_steps": 6, "save_every": 3}), out)
    return out


def test_the_run_trains_both_next_token_terms_and_records_the_codes(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(0 < r["image_loss"] < 2 * np.log(CODEBOOK) and 0 < r["text_loss"] for r in rows)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["latent_shape"] == [8, 8] and summary["model"]["image_objective"] == "tokens"


def test_pipeline_samples_codes_and_an_export_samples_the_same(run, tmp_path):
    pipe = Pipeline.from_run(run)
    assert pipe.latent_shape == (8, 8) and pipe.image_size == 16
    prompts = ["a red square", "a blue square"]
    codes = pipe.generate_latents(prompts, seed=3, cfg_scale=2.0, temperature=1.0, top_k=16)
    assert codes.shape == (2, 8, 8) and codes.dtype == torch.long and 0 <= codes.min() and codes.max() < CODEBOOK
    saved = pipe.save_pretrained(tmp_path / "model")
    again = Pipeline.from_pretrained(saved)
    assert torch.equal(again.generate_latents(prompts, seed=3, cfg_scale=2.0, temperature=1.0, top_k=16), codes)
    images = pipe.decode(codes)
    assert [im.size for im in images] == [(16, 16)] * 2
    assert [np.asarray(a).tolist() for a in again.decode(codes)] == [np.asarray(b).tolist() for b in images]
    assert pipe.caption(images, max_new_tokens=4) == again.caption(images, max_new_tokens=4)
    assert "Chameleon" in (saved / "README.md").read_text()


def test_sample_command_takes_temperature_top_k_and_top_p(run, tmp_path):
    out = tmp_path / "samples"
    assert main(["sample", "--run", str(run), "--prompt", "a red square", "--n", "2", "--seed", "5", "--cfg", "2",
                 "--temperature", "0.9", "--top-k", "20", "--top-p", "0.95", "--out", str(out), "--device", "cpu"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sampler"] == "autoregressive codes" and manifest["top_p"] == 0.95 and "steps" not in manifest
    expected = Pipeline.from_run(run).generate(["a red square"] * 2, seed=[5, 6], cfg_scale=2.0, temperature=0.9,
                                               top_k=20, top_p=0.95)
    for k, image in enumerate(expected):
        assert np.array_equal(np.asarray(Image.open(out / f"{k:05d}.png").convert("RGB")), np.asarray(image))


@pytest.mark.parametrize("flag,value", [("--scheduler", "flow"), ("--guidance-rescale", "0.7")])
def test_a_diffusion_setting_for_a_model_of_codes_is_one_line(run, tmp_path, capsys, flag, value):
    assert main(["sample", "--run", str(run), "--prompt", "a red square", flag, value,
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "draws image codes one at a time" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("case", ["tokens_model_on_latents", "diffusion_model_on_codes"])
def test_data_of_the_other_objective_is_one_line_naming_both(case, codes, data, tmp_path, capsys):
    config = tmp_path / "config.yaml"
    model = TOKENS_MODEL if case == "tokens_model_on_latents" else {}
    source = data if case == "tokens_model_on_latents" else codes
    import yaml

    from helpers import config_dict

    config.write_text(yaml.safe_dump(config_dict(source, model=model)))
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run"), "--max-steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    if case == "tokens_model_on_latents":
        assert "image_objective is tokens" in err and "continuous latents (4, 8, 8)" in err
    else:
        assert "image_objective is diffusion" in err and "VQ code grids (8, 8)" in err


def test_the_serve_page_draws_codes_as_tmot_sample_does(run):
    from transfusion_mot.inference.app import AUTOREGRESSIVE, ServeApp

    app = ServeApp(Pipeline.from_run(run), source="chameleon")
    assert app.schedulers == (AUTOREGRESSIVE,)
    out = app.generate("a red square", images_per_prompt=2, seed=5, cfg=2.0)
    expected = app.pipe.generate(["a red square"] * 2, seed=[5, 6], cfg_scale=2.0)
    assert [caption for _, caption in out] == ["a red square · seed 5", "a red square · seed 6"]
    for (image, _), same in zip(out, expected):
        assert np.array_equal(np.asarray(image), np.asarray(same))
