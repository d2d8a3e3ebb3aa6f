"""Precision, recall, density and coverage: equal to the prdc package (Naeem et al.'s own code) on the same
features; identical sets, order, broken and missing images, statistics files."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from helpers import write_images

from eval.dinov2 import load_timm_extractor
from eval.fid import compute_fd
from eval.images import ImageFolderNotFound
from eval.prdc import compute_prdc, prdc
from transfusion_mot.common.errors import InvalidInput


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("fd")
    return write_images(root / "real", 20, seed=0), write_images(root / "fake", 16, seed=1, shift=30)


@pytest.mark.parametrize("n_real, n_fake, dim, k", [(60, 45, 8, 5), (200, 150, 32, 3), (30, 90, 4, 1)])
def test_prdc_equals_the_reference_package(n_real, n_fake, dim, k, monkeypatch, capsys):
    from prdc import compute_prdc as reference

    import eval.prdc

    rng = np.random.default_rng(n_real)
    real = rng.normal(size=(n_real, dim)).astype(np.float32)
    fake = (rng.normal(size=(n_fake, dim)) * 1.2 + 0.3).astype(np.float32)
    expected = reference(real, fake, nearest_k=k)
    capsys.readouterr()  # the package prints its counts
    for block in (eval.prdc.BLOCK_ELEMENTS, 97):  # one block, and many uneven ones
        monkeypatch.setattr(eval.prdc, "BLOCK_ELEMENTS", block)
        ours = prdc(real, fake, k)
        for key in ("precision", "recall", "coverage"):
            assert ours[key] == expected[key], key
        assert ours["density"] == pytest.approx(float(expected["density"]), abs=1e-12)
    assert 0 < ours["precision"] < 1 and 0 < ours["coverage"] < 1  # a case where every test above can fail


def test_prdc_of_folders_equals_the_package_on_their_features(folders, vit, capsys):
    from prdc import compute_prdc as reference

    from eval.features import features_of

    real, fake = folders
    ours = compute_prdc(real, fake, features="dinov2", model=vit, k=4)
    extractor = load_timm_extractor(vit)
    expected = reference(features_of(real, extractor).features, features_of(fake, extractor).features, 4)
    capsys.readouterr()
    assert {key: ours[key] for key in expected} == pytest.approx({k: float(v) for k, v in expected.items()}, abs=1e-12)
    assert ours["k"] == 4 and ours["features"] == "dinov2" and "n and k" in ours["note"]


def test_identical_folders_give_zero_and_full_manifolds(folders, vit):
    real, _ = folders
    assert abs(compute_fd(real, real, features="dinov2", model=vit)["fd"]) < 1e-6
    same = compute_prdc(real, real, features="dinov2", model=vit, k=3)
    assert same["precision"] == 1.0 and same["recall"] == 1.0 and same["coverage"] == 1.0


def test_shuffled_and_broken_images(folders, vit, tmp_path):
    """Order does not matter; unreadable files are skipped and counted, as for FID."""
    real, fake = folders
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    files = sorted(fake.glob("*.png"))
    for i, j in enumerate(np.random.default_rng(0).permutation(len(files))):
        shutil.copy(files[j], shuffled / f"s{i:03d}.png")
    base_fd = compute_fd(real, fake, features="dinov2", model=vit)
    base_prdc = compute_prdc(real, fake, features="dinov2", model=vit, k=3)
    assert compute_fd(real, shuffled, features="dinov2", model=vit)["fd"] == pytest.approx(base_fd["fd"], rel=1e-9)
    moved = compute_prdc(real, shuffled, features="dinov2", model=vit, k=3)
    assert [moved[k] for k in ("precision", "recall", "density", "coverage")] == \
        [base_prdc[k] for k in ("precision", "recall", "density", "coverage")]
    (shuffled / "truncated.png").write_bytes(files[0].read_bytes()[:40])
    (shuffled / "text.jpg").write_text("hello")
    broken = compute_prdc(real, shuffled, features="dinov2", model=vit, k=3)
    assert broken["n_fake"] == 16 and broken["skipped_fake"] == 2 and broken["precision"] == base_prdc["precision"]
    assert compute_fd(real, shuffled, features="dinov2", model=vit)["skipped_fake"] == 2
    with pytest.raises(ImageFolderNotFound, match="not found"):
        compute_prdc(real, tmp_path / "nope", features="dinov2", model=vit)
    with pytest.raises(InvalidInput, match="more than 5 fake images"):
        compute_prdc(real, write_images(tmp_path / "few", 4, seed=3), features="dinov2", model=vit)
