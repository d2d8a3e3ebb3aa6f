"""CMMD: the Gaussian-kernel MMD against a NumPy reference, on CLIP embeddings, and its command."""

import json

import numpy as np
import pytest
from helpers import write_captioned

from eval.clip import image_embeddings, load_clip
from eval.cmmd import compute_cmmd, mmd


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
