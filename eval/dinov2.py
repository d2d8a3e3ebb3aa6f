"""DINOv2 features through timm, preprocessed as dgm-eval does (FD-DINOv2, Stein et al. 2023).

Why timm: it carries DINOv2 ViT-L/14 (``vit_large_patch14_dinov2.lvd142m``) and every other network people
use for these metrics, loads a hub id, ``hf-hub:ID`` or a directory saved with ``timm.models.save_for_hf``
(``local-dir:PATH``), and its ``model(x)`` with ``num_classes=0`` is the class token after the final norm:
the feature dgm-eval reads from the torch.hub DINOv2.

dgm-eval feeds 224 x 224 images to a network trained at 518 x 518, and the hub model interpolates its
position embeddings from 37 x 37 to 16 x 16 at every forward: bicubic, a scale factor of (16 + 0.1) / 37,
no antialiasing. timm's own resampling (antialiased, by size) gives other numbers, so the embeddings are
resampled here the hub's way, once, after loading. What is loaded is hashed (its state dict as loaded, so the
same weights give the same sha256 from the hub cache or a local directory, in either file format), and every
result says which network, file and resize made it.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from transfusion_mot.common.errors import InputNotFound, InvalidInput

from .features import FeatureExtractor, module_sha256

DEFAULT_DINOV2_MODEL = "vit_large_patch14_dinov2.lvd142m"
DINOV2_RESOLUTION = 224
HUB_INTERPOLATE_OFFSET = 0.1  # DINOv2's hub models: scale factor (grid + 0.1) / old grid
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class FeatureNetNotFound(InputNotFound):
    """A timm network that is neither a local directory nor in the Hugging Face cache (offline)."""


def _how_to_provide(name: str) -> str:
    return (f"download it once with network access (--allow-download), or save it with "
            f"timm.models.save_for_hf(timm.create_model({name!r}, pretrained=True), DIR) and pass local-dir:DIR")


def resolve_timm_model(name: str, allow_download: bool = False) -> tuple[str, Path | None]:
    """(what ``timm.create_model`` is given, the local directory holding its weights).

    ``local-dir:PATH`` must exist; a timm name with a Hugging Face hub id (every DINOv2 tag has one) and
    ``hf-hub:ID`` are read from the Hugging Face cache, downloaded into it only with ``allow_download``."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    if name.startswith("local-dir:"):
        path = Path(name[len("local-dir:"):]).expanduser()
        if not (path / "config.json").is_file():
            raise FeatureNetNotFound(f"{path} is not a timm model directory (no config.json; save one with "
                                     "timm.models.save_for_hf)")
        return f"local-dir:{path}", path
    if name.startswith("hf-hub:"):
        repo_id = name[len("hf-hub:"):]
        if not repo_id:
            raise InvalidInput("hf-hub: needs a repository id (hf-hub:ORG/NAME)")
    else:
        import timm

        if name.split(".")[0] not in timm.list_models():
            raise InvalidInput(f"unknown timm model {name!r} (a timm name, hf-hub:ID or local-dir:PATH)")
        try:
            cfg = timm.models.get_pretrained_cfg(name)
        except RuntimeError as err:  # a known architecture with an unknown pretrained tag
            raise InvalidInput(f"unknown timm model {name!r}: {str(err).splitlines()[0][:160]}") from None
        repo_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
        if not repo_id:
            if not allow_download:
                raise FeatureNetNotFound(f"timm model {name!r} has no Hugging Face hub id, so its weights cannot be "
                                         f"read from a local cache; {_how_to_provide(name)}")
            return name, None
    try:
        config = hf_hub_download(repo_id, "config.json", local_files_only=not allow_download)
        folder = Path(config).parent
        for weights in WEIGHT_FILES:
            with contextlib.suppress(EntryNotFoundError, LocalEntryNotFoundError):
                hf_hub_download(repo_id, weights, local_files_only=not allow_download)
                break
        else:
            raise FeatureNetNotFound(f"no weights file ({' or '.join(WEIGHT_FILES)}) of {repo_id} in the Hugging Face "
                                     f"cache or on the hub; {_how_to_provide(name)}")
    except LocalEntryNotFoundError:
        raise FeatureNetNotFound(f"timm model {name!r} ({repo_id}) is not in the Hugging Face cache; "
                                 f"{_how_to_provide(name)}") from None
    except OSError as err:
        raise FeatureNetNotFound(f"could not fetch timm model {name!r} ({repo_id}): {str(err).splitlines()[0][:160]}; "
                                 f"{_how_to_provide(name)}") from None
    except ValueError as err:  # huggingface_hub's HFValidationError: not a valid repository id
        raise InvalidInput(f"{name!r} is not a valid hub id: {str(err).splitlines()[0][:160]}") from None
    return f"local-dir:{folder}", folder


def hub_resampled_pos_embed(pos_embed: torch.Tensor, new_grid: int, prefix_tokens: int = 1) -> torch.Tensor:
    """(1, prefix + M*M, D) position embeddings on a new_grid x new_grid grid, as DINOv2's hub models
    interpolate them: bicubic, scale factor (new_grid + 0.1) / M, no antialiasing, prefix tokens kept."""
    prefix, grid = pos_embed[:, :prefix_tokens], pos_embed[:, prefix_tokens:].float()
    old = math.isqrt(grid.shape[1])
    if old * old != grid.shape[1]:
        raise InvalidInput(f"position embeddings of {grid.shape[1]} patches are not a square grid")
    scale = (new_grid + HUB_INTERPOLATE_OFFSET) / old
    grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=(scale, scale), mode="bicubic", antialias=False)
    if grid.shape[-2:] != (new_grid, new_grid):
        raise AssertionError(f"interpolated to {tuple(grid.shape[-2:])}, expected {new_grid}x{new_grid}")
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, -1).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


def _set_resolution(model: torch.nn.Module, resolution: int) -> str:
    """Make a ViT take resolution x resolution images with hub-style resampled position embeddings; say what
    was done. Networks without absolute position embeddings (CNNs) take any size as they are."""
    pos_embed = getattr(model, "pos_embed", None)
    patch_embed = getattr(model, "patch_embed", None)
    if pos_embed is None or patch_embed is None:
        return "no position embeddings to resample"
    if not hasattr(model, "set_input_size"):
        import timm

        raise InvalidInput(f"this timm ({timm.__version__}) cannot set a ViT's input size; pip install 'timm>=1.0.20'")
    patch = patch_embed.patch_size[0]
    if resolution % patch:
        raise InvalidInput(f"resolution {resolution} is not a multiple of the patch size {patch}")
    new_grid = resolution // patch
    old_grid = tuple(patch_embed.grid_size)
    if old_grid == (new_grid, new_grid):
        return f"position embeddings already {new_grid}x{new_grid}"
    if getattr(model, "no_embed_class", False):
        prefix = 0
    else:
        prefix = getattr(model, "num_prefix_tokens", 1)
    original = pos_embed.detach().clone()
    model.set_input_size(img_size=(resolution, resolution))
    with torch.no_grad():
        model.pos_embed.copy_(hub_resampled_pos_embed(original, new_grid, prefix))
    return (f"position embeddings {old_grid[0]}x{old_grid[1]} -> {new_grid}x{new_grid} as DINOv2's hub "
            f"(bicubic, scale (grid+{HUB_INTERPOLATE_OFFSET})/old, no antialias)")


def load_timm_extractor(name: str = DEFAULT_DINOV2_MODEL, resolution: int = DINOV2_RESOLUTION,
                        device: str | torch.device = "cpu", allow_download: bool = False) -> FeatureExtractor:
    """A timm network as the ``dinov2`` feature space: pooled features (the class token after the final norm
    for DINOv2) of images resized as dgm-eval resizes them, normalised with the network's own mean/std."""
    import timm

    source, folder = resolve_timm_model(name, allow_download)
    try:
        model = timm.create_model(source, pretrained=True, num_classes=0)
    except (OSError, RuntimeError, ValueError, KeyError) as err:
        raise InvalidInput(f"could not load timm model {name!r}: {str(err).strip().splitlines()[0][:200]}") from None
    weights = next((folder / w for w in WEIGHT_FILES if folder is not None and (folder / w).is_file()), None)
    sha = module_sha256(model)  # the weights as loaded, whichever route (cache, local-dir, file format) they came by
    resampled = _set_resolution(model, resolution)
    model = model.eval().requires_grad_(False).to(device)
    data = timm.data.resolve_model_data_config(model)
    mean = np.asarray(data["mean"], dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(data["std"], dtype=np.float32).reshape(3, 1, 1)
    identity = {"extractor": f"timm:{name}", "extractor_sha256": sha,
                "extractor_path": str(weights) if weights is not None else name, "position_embeddings": resampled}

    def preprocess(image: np.ndarray) -> np.ndarray:
        resized = Image.fromarray(image).resize((resolution, resolution), Image.Resampling.BICUBIC)
        x = np.asarray(resized, dtype=np.float32).transpose(2, 0, 1) / 255.0
        return (x - mean) / std

    mean_text = ", ".join(f"{v:.3f}" for v in data["mean"])
    std_text = ", ".join(f"{v:.3f}" for v in data["std"])
    return FeatureExtractor("dinov2", model, preprocess, identity, "pil-bicubic", resolution,
                            f"PIL bicubic resize of the uint8 image to {resolution}x{resolution} (dgm-eval's "
                            f"torchvision Resize), [0, 1], mean ({mean_text}), std ({std_text})", model)


__all__ = ["DEFAULT_DINOV2_MODEL", "DINOV2_RESOLUTION", "FeatureNetNotFound", "hub_resampled_pos_embed",
           "load_timm_extractor", "resolve_timm_model"]

