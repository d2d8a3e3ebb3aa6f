"""The tiny VAE shipped for the built-in shapes data: it is the shipped config's architecture, it reconstructs
shapes it never saw (another seed of the generator) with what the shipped judge can still read, and the built-in
data preparation copies it unchanged instead of training one."""

import hashlib
from pathlib import Path

import pytest
import torch

from eval.align import load_classifier, score_alignment
from transfusion_mot.common.errors import ConfigError
from transfusion_mot.common.images import images_from_tensor
from transfusion_mot.data.readers import ImageFolderReader
from transfusion_mot.data.shapes import generate_shapes
from transfusion_mot.recipes.prepare import prepare_builtin, vae_config_for
from vae import build_vae, decode, encode, load_vae, load_vae_config, psnr_per_image
from vae.shipped import PRETRAINED_DIR, copy_shipped_vae, shipped_vae_dir

# measured on 256 renders of seed 4242 (the VAE was trained on seed 0's): PSNR 35.1 dB; the shipped judge reads
# 98.8% all correct on the originals and 99.6% on the reconstructions (colour 99.6%, shape 99.6%). The 300-step VAE
# shipped before it: 26.2 dB, 77.3% (colour 93.4%, shape 80.9%: small shapes lost their corners), which these
# bounds refuse. A VAE at its random initialisation: ~8 dB, nothing read. Bounds with margin
MIN_PSNR = 33.0
MIN_DECODED = {"colour": 0.97, "shape": 0.97, "all_correct": 0.95}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def unseen_shapes(tmp_path_factory):
    """256 shapes renders from a seed the shipped VAE was not trained on."""
    folder = tmp_path_factory.mktemp("shapes") / "data"
    generate_shapes(folder, num=256, size=32, seed=4242, val_fraction=0.0)
    reader = ImageFolderReader(folder, split="train", size=32)
    return reader.batch(list(range(len(reader))))


def test_shipped_vae_is_the_shipped_config_s_architecture():
    shipped = load_vae(shipped_vae_dir("shapes", 32))
    built = build_vae(load_vae_config(vae_config_for(32)))
    assert {k: tuple(v.shape) for k, v in shipped.state_dict().items()} == {
        k: tuple(v.shape) for k, v in built.state_dict().items()}
    scale, shift = shipped.config.scaling_factor, shipped.config.shift_factor
    assert scale != 1.0 and shift != 0.0  # the latent statistics of its training data travel with it


def test_shipped_vae_reconstructs_unseen_shapes_so_the_judge_still_reads_them(unseen_shapes):
    images, captions = unseen_shapes["image"], unseen_shapes["text"]
    shipped = load_vae(shipped_vae_dir("shapes", 32))
    with torch.no_grad():
        recon = decode(shipped, encode(shipped, images)).clamp(-1, 1)
        untrained = build_vae(load_vae_config(vae_config_for(32))).eval()
        noise = untrained.decode(untrained.encode(images).latent_dist.mode()).sample.clamp(-1, 1)
    psnr = float(psnr_per_image(images, recon).mean())
    assert psnr >= MIN_PSNR and float(psnr_per_image(images, noise).mean()) < MIN_PSNR - 10
    judge = load_classifier()
    original = score_alignment(judge, images_from_tensor(images), captions)
    decoded = score_alignment(judge, images_from_tensor(recon), captions)
    assert original["all_correct"] >= 0.97
    for key, bound in MIN_DECODED.items():
        assert decoded[key] >= bound, (key, original, decoded)


def test_copy_is_byte_identical_and_replaces_what_was_there(tmp_path):
    target = tmp_path / "vae"
    target.mkdir()
    (target / "stale.bin").write_bytes(b"x")
    copy_shipped_vae("shapes", 32, target)
    source = PRETRAINED_DIR / "shapes-32"
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in source.iterdir())
    for file in source.iterdir():
        assert _sha256(target / file.name) == _sha256(file)
    assert not [p for p in tmp_path.iterdir() if p.name != "vae"]  # no staging directory left behind


@pytest.mark.parametrize("name, size", [("emoji", 32), ("shapes", 64)])
def test_no_shipped_vae_is_a_one_line_config_error(name, size):
    with pytest.raises(ConfigError, match="builtin_vae: train"):
        shipped_vae_dir(name, size)


def test_prepare_builtin_copies_the_shipped_vae_and_trains_none(tmp_path):
    root = tmp_path / "shapes-32"
    prepared = prepare_builtin("shapes", root, num_images=40, vae="shipped", progress=False, log=lambda *a: None)
    assert prepared.info["vae_shipped"] is True and "vae_train" not in prepared.info
    weights = "diffusion_pytorch_model.safetensors"
    assert _sha256(prepared.vae_dir / weights) == _sha256(PRETRAINED_DIR / "shapes-32" / weights)
    assert not (prepared.vae_dir / "checkpoints").exists()
    assert prepared.info["latents"] + prepared.info["val_latents"] == 40
    again = prepare_builtin("shapes", root, num_images=40, vae="shipped", progress=False, log=lambda *a: None)
    assert again.info["reused"] == ["data", "vae", "latents", "latents-val"]
    with pytest.raises(ConfigError, match="no shipped VQ tokenizer"):
        prepare_builtin("shapes", tmp_path / "codes", num_images=40, vae="shipped", codes=True, progress=False)
    with pytest.raises(ConfigError, match="no shipped VAE for the built-in emoji"):
        prepare_builtin("emoji", tmp_path / "emoji", vae="shipped", progress=False)
    assert not (tmp_path / "emoji").exists() and not (tmp_path / "codes").exists()  # refused before any work


def test_a_reused_vae_that_is_not_the_shipped_one_is_named(tmp_path):
    """A folder prepared by an older release (another shipped VAE) or by a trained VAE is reused, with a note that
    says so and how to rebuild; the shipped copy gets no note."""
    from vae.shipped import is_shipped_copy

    notes = []
    root = tmp_path / "shapes-32"
    prepare_builtin("shapes", root, num_images=40, vae="shipped", progress=False, log=notes.append)
    assert is_shipped_copy("shapes", 32, root / "vae")
    again = prepare_builtin("shapes", root, num_images=40, vae="shipped", progress=False, log=notes.append)
    assert "vae_not_shipped" not in again.info and not [n for n in notes if "note:" in n]
    weights = root / "vae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of another VAE
    weights.write_bytes(bytes(data))
    assert not is_shipped_copy("shapes", 32, root / "vae")
    stale = prepare_builtin("shapes", root, num_images=40, vae="shipped", progress=False, log=notes.append)
    assert stale.info["vae_not_shipped"] is True and stale.info["reused"] == ["data", "vae", "latents", "latents-val"]
    expected = (f"[prepare] note: {root / 'vae'} is not the VAE shipped with this package (trained here, or an older "
                f"release's); reusing it and its latents. Delete {root} to rebuild with the shipped one")
    assert [n for n in notes if "note:" in n] == [expected]


def test_the_recipes_name_the_shipped_vae_s_own_steps():
    """shapes-tiny and lmfusion-shapes say how many steps train a VAE like the shipped one (their `train`
    alternative): the steps its training config records."""
    import yaml

    from transfusion_mot.config import load_run_config

    shipped_steps = yaml.safe_load((PRETRAINED_DIR / "shapes-32" / "vae_config.yaml").read_text())["train"]["max_steps"]
    for recipe in ("shapes-tiny", "lmfusion-shapes"):
        data = load_run_config(recipe, resolve_pretrained=False).data
        assert (data.builtin_vae, data.builtin_vae_steps) == ("shipped", shipped_steps), recipe
