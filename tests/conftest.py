"""Test-wide settings: deterministic CPU torch, no network in any test, shared tiny training data."""

import os
import socket
import urllib.request

import pytest
import torch

# deterministic, single-threaded CPU tests; no test may reach the network
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.use_deterministic_algorithms(True)
# with pytest-xdist (-n N) each of the N workers takes its share of the cores, so they do not oversubscribe them
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, torch.get_num_threads() // _WORKERS))


def pytest_collection_modifyitems(config, items):
    """`gpu` tests skip themselves where torch sees no CUDA device (CI, laptops)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """Tiny training data shared by the training tests: an image folder, a VAE and a latent cache."""
    from helpers import make_training_data

    return make_training_data(tmp_path_factory.mktemp("traindata"))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A 6-step run on 24 images (16 px -> 8x8x4 latents) with EMA, shared by the inference tests."""
    from helpers import make_config, make_training_data

    from transfusion_mot.recipes.train import train

    root = tmp_path_factory.mktemp("tinyrun")
    data = make_training_data(root)
    train(make_config(data, train={"max_steps": 6, "save_every": 3}), root / "run")
    return root / "run"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def _refuse(*args, **kwargs):
    raise AssertionError("a test tried to reach the network")


_connect = socket.socket.connect
_urlopen = urllib.request.urlopen


def _loopback_urlopen(url, *args, **kwargs):
    target = url if isinstance(url, str) else url.full_url
    if target.startswith(("http://127.0.0.1:", "http://localhost:")):
        return _urlopen(url, *args, **kwargs)
    return _refuse()


def _local_only(sock, address):
    """Unix-domain sockets (DataLoader workers pass tensors through them) and this machine's loopback (a
    served page) stay usable; the network does not."""
    if sock.family == getattr(socket, "AF_UNIX", None):
        return _connect(sock, address)
    if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] in ("127.0.0.1", "::1", "localhost"):
        return _connect(sock, address)
    return _refuse()


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Block sockets, urllib and clean-fid's downloaders for the duration of every test."""
    import cleanfid.downloads_helper as downloads
    import cleanfid.inception_torchscript as torchscript
    from cleanfid import features

    monkeypatch.setattr(socket.socket, "connect", _local_only)
    monkeypatch.setattr(urllib.request, "urlopen", _loopback_urlopen)
    monkeypatch.setattr(downloads, "check_download_inception", _refuse)
    monkeypatch.setattr(downloads, "check_download_url", _refuse)
    monkeypatch.setattr(torchscript, "check_download_inception", _refuse)
    monkeypatch.setattr(features, "check_download_url", _refuse)
    yield
