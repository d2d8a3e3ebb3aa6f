"""DINOv2 features through timm (FD-DINOv2): equal to timm's forward with torchvision's transforms and the
closed-form Frechet distance; position embeddings resampled as DINOv2's hub does; hub names read the cache."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from helpers import make_tiny_timm_vit, scipy_frechet_distance, write_images
from PIL import Image

from eval.dinov2 import FeatureNetNotFound, hub_resampled_pos_embed, load_timm_extractor
from eval.fid import compute_fd, load_feature_extractor
from transfusion_mot.common.errors import InvalidInput


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("fd")
    return write_images(root / "real", 20, seed=0), write_images(root / "fake", 16, seed=1, shift=30)


def reference_features(vit_dir, paths) -> np.ndarray:
    """dgm-eval's pipeline written with timm and torchvision directly: Resize((224, 224), bicubic) of the PIL
    image, ToTensor, ImageNet Normalize, then the network's pooled output."""
    import timm
    import torchvision.transforms as T

    model = timm.create_model(f"local-dir:{vit_dir}", pretrained=True, num_classes=0).eval()
    transform = T.Compose([T.Resize((224, 224), T.InterpolationMode.BICUBIC), T.ToTensor(),
                           T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    with torch.no_grad():
        x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
        return model(x).double().numpy()


def test_fd_dinov2_equals_timm_forward_and_the_closed_form(folders, vit_dir, vit):
    import timm

    from eval.features import module_sha256

    real, fake = folders
    ours = compute_fd(real, fake, features="dinov2", model=vit, batch_size=7)
    a = reference_features(vit_dir, sorted(real.glob("*.png")))
    b = reference_features(vit_dir, sorted(fake.glob("*.png")))
    assert a.shape == (20, 32) and a.std(0).min() > 1e-3  # the features see the images
    expected = scipy_frechet_distance(a, b)
    assert expected > 1e-3
    assert ours["fd"] == pytest.approx(expected, rel=1e-4)
    assert ours["features"] == "dinov2" and "fid" not in ours and ours["kid"] is None
    assert ours["n_real"] == 20 and ours["n_fake"] == 16 and ours["resolution"] == 224
    assert ours["extractor_path"].endswith("model.safetensors")
    assert ours["extractor_sha256"] == module_sha256(timm.create_model(f"local-dir:{vit_dir}", pretrained=True,
                                                                       num_classes=0))
    assert "224x224" in ours["preprocessing"] and "0.485" in ours["preprocessing"] and "small n" in ours["small_n"]


def test_features_equal_the_reference_pipeline(folders, vit_dir, vit):
    from eval.features import features_of

    real, _ = folders
    ours = features_of(real, load_timm_extractor(vit), batch_size=8).features
    np.testing.assert_allclose(ours, reference_features(vit_dir, sorted(real.glob("*.png"))), rtol=0, atol=2e-5)


def test_position_embeddings_are_resampled_as_dinov2s_hub_does(tmp_path, folders):
    """A network saved at 98 px (7x7 patches) read at 224 (16x16): DINOv2's hub interpolation, written here as
    its interpolate_pos_encoding does it, and not timm's own antialiased resampling."""
    import math

    import timm
    import torch.nn.functional as F

    saved = make_tiny_timm_vit(tmp_path / "vit98", img_size=98)
    original = timm.create_model(f"local-dir:{saved}", pretrained=True, num_classes=0).pos_embed.detach()
    extractor = load_timm_extractor(f"local-dir:{saved}")
    n = original.shape[1] - 1
    m = int(math.sqrt(n))
    w0 = h0 = 224 // 14
    patch = F.interpolate(original[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2),
                          scale_factor=((w0 + 0.1) / m, (h0 + 0.1) / m), mode="bicubic", antialias=False)
    hub = torch.cat([original[:, :1], patch.permute(0, 2, 3, 1).reshape(1, w0 * h0, -1)], dim=1)
    torch.testing.assert_close(extractor.module.pos_embed.detach(), hub, rtol=0, atol=1e-6)
    from timm.layers import resample_abs_pos_embed

    timm_way = resample_abs_pos_embed(original, (16, 16), (7, 7), num_prefix_tokens=1)
    assert (timm_way - hub).abs().max() > 1e-3  # the two ways differ: the test can tell them apart
    assert "7x7 -> 16x16" in extractor.identity["position_embeddings"]
    torch.testing.assert_close(hub_resampled_pos_embed(original, 16), hub, rtol=0, atol=1e-6)
    real, _ = folders
    assert compute_fd(real, real, extractor)["n_real"] == 20  # and it runs at 224


def test_hub_names_read_the_cache_only(tmp_path, vit_dir, monkeypatch):
    """The default DINOv2 name resolves through its hub id to the Hugging Face cache; nothing is downloaded."""
    import huggingface_hub.constants

    snapshot = tmp_path / "hub" / "models--timm--vit_large_patch14_dinov2.lvd142m" / "snapshots" / ("0" * 40)
    shutil.copytree(vit_dir, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    extractor = load_feature_extractor("dinov2")
    assert extractor.identity["extractor"] == "timm:vit_large_patch14_dinov2.lvd142m"
    assert extractor.identity["extractor_path"] == str(snapshot / "model.safetensors")
    # the same weights by another route have the same sha256, so statistics made either way stay comparable
    local = load_feature_extractor("dinov2", f"local-dir:{vit_dir}")
    assert local.identity["extractor_sha256"] == extractor.identity["extractor_sha256"]
    assert not any(p.requires_grad for p in extractor.module.parameters())
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(FeatureNetNotFound, match="not in the Hugging Face cache.*local-dir"):
        load_feature_extractor("dinov2")
    for typo in ("not_a_model_name", "vit_large_patch14_dinov2.lvd142x"):  # a name, a pretrained tag
        with pytest.raises(InvalidInput, match="unknown timm model"):
            load_feature_extractor("dinov2", typo)
    for bad in ("hf-hub:", "hf-hub:a b"):
        with pytest.raises(InvalidInput, match="hub id|repository id"):
            load_feature_extractor("dinov2", bad)
    with pytest.raises(FeatureNetNotFound, match="no config.json"):
        load_feature_extractor("dinov2", f"local-dir:{tmp_path / 'missing'}")
