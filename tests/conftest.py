import os

import pytest
import torch

# deterministic, single-threaded CPU tests; no test may reach the network
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.use_deterministic_algorithms(True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def tiny_config(**overrides):
    from transfusion_mot.config import ModelConfig

    base = dict(dim=64, n_layers=2, n_heads=4, ffn_dim=96, vocab_size=64, latent_channels=4, patch_size=2,
                max_seq_len=128)
    base.update(overrides)
    return ModelConfig(**base)


def random_samples(config, n=2, seed=0, caption=(3, 9), latent=(4, 6)):
    """Mixed samples: caption-first and image-first, latents of different sizes."""
    from transfusion_mot.batch import Sample

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(caption[0], caption[1], (1,), generator=g))
        text = torch.randint(0, config.vocab_size - 5, (length,), generator=g).tolist()
        side = latent[i % len(latent)]
        image = torch.randn(config.latent_channels, side, side + 2, generator=g)
        out.append(Sample([text, image] if i % 3 != 2 else [image, text]))
    return out
