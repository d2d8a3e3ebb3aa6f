"""Feature spaces: statistics carry their space, network and resize (a mismatch is refused); the Inception
space is FID; CLIP features are CMMD's embeddings."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import TinyExtractor, make_tiny_timm_vit, scipy_frechet_distance, write_images

from eval.fid import FeatureStats, StatsMismatch, compute_fd, compute_fid, load_feature_extractor, save_reference_stats
from eval.prdc import compute_prdc
from transfusion_mot.common.errors import InvalidInput


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("fd")
    return write_images(root / "real", 20, seed=0), write_images(root / "fake", 16, seed=1, shift=30)


def test_dinov2_statistics_round_trip_and_refusals(folders, vit, tmp_path):
    real, fake = folders
    meta = save_reference_stats(real, tmp_path / "ref.npz", features="dinov2", model=vit)
    assert meta["features"] == "dinov2" and meta["mode"] == "pil-bicubic" and meta["resolution"] == 224
    stats = FeatureStats.load(tmp_path / "ref.npz")
    assert stats.space == "dinov2" and stats.features.shape == (20, 32)
    folder = compute_fd(real, fake, features="dinov2", model=vit)
    assert compute_fd(tmp_path / "ref.npz", fake, features="dinov2", model=vit)["fd"] == pytest.approx(folder["fd"],
                                                                                                        rel=1e-9)
    from_stats = compute_prdc(tmp_path / "ref.npz", fake, features="dinov2", model=vit, k=3)
    assert from_stats["precision"] == compute_prdc(real, fake, features="dinov2", model=vit, k=3)["precision"]
    with pytest.raises(StatsMismatch, match="hold dinov2 features"):
        compute_fid(tmp_path / "ref.npz", fake, TinyExtractor())
    other = make_tiny_timm_vit(tmp_path / "other", seed=1)
    with pytest.raises(StatsMismatch, match="sha256"):
        compute_fd(tmp_path / "ref.npz", fake, features="dinov2", model=f"local-dir:{other}")
    stats.save(tmp_path / "nofeats.npz", include_features=False)
    with pytest.raises(InvalidInput, match="without their features"):
        compute_prdc(tmp_path / "nofeats.npz", fake, features="dinov2", model=vit)


def test_inception_space_keeps_fid(folders):
    real, fake = folders
    extractor = TinyExtractor()
    fd = compute_fd(real, fake, extractor, kid=True)
    fid = compute_fid(real, fake, extractor)
    assert fd["fd"] == fd["fid"] == fid["fid"] and fd["kid"] == fid["kid"] and fid["features"] == "inception"


def test_clip_space(folders, clip_dir):
    """CLIP features are CMMD's embeddings (squash resize, L2-normalised); FD of the same folder is 0."""
    from eval.clip import image_embeddings, load_clip
    from eval.features import features_of
    from eval.images import LazyImages, list_images

    real, fake = folders
    extractor = load_feature_extractor("clip", clip_dir)
    ours = features_of(real, extractor, batch_size=6).features
    expected = image_embeddings(load_clip(clip_dir), LazyImages(list_images(real)), squash=True).numpy()
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5)
    assert compute_fd(real, fake, extractor)["fd"] == pytest.approx(scipy_frechet_distance(
        expected.astype(np.float64), features_of(fake, extractor).features.astype(np.float64)), rel=1e-4)
    assert abs(compute_fd(real, real, extractor)["fd"]) < 1e-6


def test_two_statistics_files_need_no_network(folders, vit, tmp_path):
    """Statistics against statistics: compared with each other, their space taken from the files."""
    real, fake = folders
    save_reference_stats(real, tmp_path / "real.npz", features="dinov2", model=vit)
    save_reference_stats(fake, tmp_path / "fake.npz", features="dinov2", model=vit)
    expected = compute_fd(real, fake, features="dinov2", model=vit)
    # no network named: the default DINOv2 is not in this test's (empty) cache, so loading it would fail
    from_files = compute_fd(tmp_path / "real.npz", tmp_path / "fake.npz")
    assert from_files["features"] == "dinov2" and from_files["fd"] == pytest.approx(expected["fd"], rel=1e-9)
    assert from_files["extractor_sha256"] == expected["extractor_sha256"]
    pr = compute_prdc(tmp_path / "real.npz", tmp_path / "fake.npz", k=3)
    assert pr["precision"] == compute_prdc(real, fake, model=vit, k=3)["precision"]
    save_reference_stats(fake, tmp_path / "inception.npz", TinyExtractor())
    with pytest.raises(StatsMismatch, match="different features"):
        compute_fd(tmp_path / "real.npz", tmp_path / "inception.npz")
    other = make_tiny_timm_vit(tmp_path / "other", seed=1)
    save_reference_stats(fake, tmp_path / "other.npz", features="dinov2", model=f"local-dir:{other}")
    with pytest.raises(StatsMismatch, match="different features .extractor_sha256"):
        compute_fd(tmp_path / "real.npz", tmp_path / "other.npz")
    with pytest.raises(StatsMismatch, match="holds dinov2 features, not inception"):
        compute_fd(tmp_path / "real.npz", tmp_path / "fake.npz", features="inception")
