"""The batch format: samples (ordered text segments and image latents) -> padded or packed tensors.

A sample is a list of segments in reading order; a segment is either text (a 1-D sequence of token ids,
without special tokens) or an image: a latent (a float tensor (C, H, W)) for the diffusion objective, or
the code grid of a VQ tokenizer (an integer tensor (h, w)) for the tokens objective. The collator lays a
sample out as

    BOS  text...  BOI  p_1 ... p_N  EOI  text...  EOS

with the latent cut into patch_size x patch_size patches in row-major order, or the codes in row-major
order (each code one position, its id in `tokens`, next-code targets in `Batch.image_targets`). `collate_padded` gives one
sample per row; `collate_packed` fills rows up to a token budget with several samples (document ids keep
them apart in attention, positions restart at 0 for each).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields, replace
from typing import Sequence, Union

import numpy as np
import torch
from torch import Tensor

from .common.errors import InvalidInput
from .config import ModelConfig

IGNORE_INDEX = -100
Segment = Union[Sequence[int], Tensor]


@dataclass(frozen=True)
class SpecialTokens:
    """The ids the layout adds around text and images. `bos` is None for a pretrained tokenizer that starts
    documents with no token of its own (Qwen), so its documents are laid out exactly as the LM saw them."""

    bos: int | None
    eos: int
    pad: int
    boi: int
    eoi: int

    @classmethod
    def at_end_of_vocab(cls, vocab_size: int) -> "SpecialTokens":
        """The convention of the built-in tokenizers: the last five ids of the vocabulary."""
        return cls(bos=vocab_size - 5, eos=vocab_size - 4, pad=vocab_size - 3, boi=vocab_size - 2,
                   eoi=vocab_size - 1)


@dataclass
class Sample:
    segments: list[Segment]
    image_first: bool | None = None  # None: derived (True when an image comes before any text)

    def is_image_first(self) -> bool:
        if self.image_first is not None:
            return self.image_first
        for seg in self.segments:
            if is_image(seg):
                return True
            if len(seg) > 0:
                return False
        return False


def is_image(segment: Segment) -> bool:
    """A float latent (C, H, W) or an integer code grid (h, w); text is 1-D."""
    return isinstance(segment, Tensor) and (segment.is_floating_point() or segment.dim() == 2)


@dataclass
class ModelInputs:
    """What the backbone consumes (see README, batch format).

    tokens, modality, positions, doc_ids, image_ids: (B, L) long. patches: (P, patch_dim) latent patches of the
    image positions, in row-major sequence order; patch_coords: (P, 2) (row, col) in the image's patch grid;
    patch_image: (P,) image index; timesteps: (I,) diffusion timestep of each image, in [0, T]. With the
    tokens objective the image positions' `tokens` are codebook ids, `patches` is empty (0, patch_dim) and
    timesteps are unused.
    """

    tokens: Tensor
    modality: Tensor
    positions: Tensor
    doc_ids: Tensor
    image_ids: Tensor
    patches: Tensor
    patch_coords: Tensor
    patch_image: Tensor
    timesteps: Tensor

    def to(self, device: torch.device | str) -> ModelInputs:
        return ModelInputs(**{f.name: getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)})

    def window(self, start: int, stop: int, image_modality: int) -> ModelInputs:
        """Positions [start, stop) of every row, with the patches of the image positions among them (every
        image keeps its timestep): a chunk to run after the positions before `start` are in a KV cache."""
        is_image = (self.modality == image_modality).reshape(-1)
        inside = torch.zeros_like(self.modality, dtype=torch.bool)
        inside[:, start:stop] = True
        chosen = inside.reshape(-1)[is_image]  # (P,): does patch k lie in the window
        cut = {name: getattr(self, name)[:, start:stop] for name in ("tokens", "modality", "positions", "doc_ids",
                                                                     "image_ids")}
        patches = self.patches[chosen] if self.patches.shape[0] else self.patches  # tokens: none
        return ModelInputs(**cut, patches=patches, patch_coords=self.patch_coords[chosen],
                           patch_image=self.patch_image[chosen], timesteps=self.timesteps)

    def check(self, config: ModelConfig) -> None:
        """ValueError naming the problem, for inputs a collator would not produce."""
        if self.tokens.dim() != 2:
            raise ValueError(f"tokens must be (batch, seq), got shape {tuple(self.tokens.shape)}")
        batch, seq = self.tokens.shape
        for name in ("modality", "positions", "doc_ids", "image_ids"):
            if tuple(getattr(self, name).shape) != (batch, seq):
                raise ValueError(f"{name} must have shape {(batch, seq)}, got {tuple(getattr(self, name).shape)}")
        if seq > config.max_seq_len:
            raise ValueError(f"sequence length {seq} exceeds max_seq_len {config.max_seq_len}")
        if self.patches.dim() != 2 or self.patches.shape[1] != config.patch_dim:
            raise ValueError(f"patches must be (P, {config.patch_dim}) = (P, latent_channels*patch_size^2), "
                             f"got {tuple(self.patches.shape)}")
        # one host sync for all value checks (this runs every step)
        is_image = self.modality == config.modalities.index("image")
        text = self.tokens.masked_fill(is_image, 0) if config.image_tokens else self.tokens
        # image codes are checked only where they exist (diffusion: nothing to check, no extra op per step)
        codes = self.tokens.masked_fill(~is_image, 0) if config.image_tokens else torch.zeros((), dtype=torch.long)
        lo, hi, c_lo, c_hi, m_lo, m_hi, n_image = torch.stack([
            text.min(), text.max(), codes.min(), codes.max(), self.modality.min(), self.modality.max(),
            is_image.sum()]).tolist()
        if lo < 0 or hi >= config.vocab_size:
            raise ValueError(f"token ids must be in [0, {config.vocab_size}), got range [{lo}, {hi}]")
        if m_lo < 0 or m_hi >= config.num_modalities:
            raise ValueError(f"modality ids must be in [0, {config.num_modalities}), got [{m_lo}, {m_hi}]")
        if config.image_tokens:
            if c_lo < 0 or c_hi >= config.codebook_size:
                raise ValueError(f"image codes must be in [0, {config.codebook_size}), got range [{c_lo}, {c_hi}]")
            if self.patches.shape[0]:
                raise ValueError("image_objective tokens reads image codes from `tokens`, but patches were given")
        elif n_image != self.patches.shape[0]:
            raise ValueError(f"{n_image} image positions in the sequence but {self.patches.shape[0]} patches")
        if self.patch_coords.shape[0] != n_image:
            raise ValueError(f"{n_image} image positions in the sequence but {self.patch_coords.shape[0]} patch_coords")


@dataclass
class Batch:
    """One collated batch: the model's inputs with the CLEAN latent patches (the loss noises them and sets the
    timesteps), and what the losses need besides.

    text_targets: (B, L) next-token target at each position, IGNORE_INDEX where no LM loss applies (image
    patches, the last token of a document, padding, and positions whose next token is an image patch).
    image_first: (I,) bool, the image precedes its caption (captioning direction); image_shapes: latent
    (C, H, W) or code grid (h, w) per image. image_targets (tokens objective): (B, L) the next image code at
    each position whose next position is an image code (the BOI and every code but the last), IGNORE_INDEX
    elsewhere; None for the diffusion objective.
    """

    inputs: ModelInputs
    text_targets: Tensor
    image_first: Tensor
    image_shapes: list[tuple[int, ...]] = field(default_factory=list)
    image_targets: Tensor | None = None

    @property
    def num_images(self) -> int:
        return len(self.image_shapes)

    def to(self, device: torch.device | str) -> Batch:
        image_targets = None if self.image_targets is None else self.image_targets.to(device, non_blocking=True)
        return Batch(self.inputs.to(device), self.text_targets.to(device, non_blocking=True),
                     self.image_first.to(device, non_blocking=True), self.image_shapes, image_targets)

    def noised(self, patches: Tensor, timesteps: Tensor) -> ModelInputs:
        """The inputs with the given (noisy) patches and per-image timesteps."""
        return replace(self.inputs, patches=patches, timesteps=timesteps)


def patchify(latent: Tensor, patch: int) -> Tensor:
    """(C, H, W) -> (H/p * W/p, C*p*p), row-major over the patch grid."""
    c, h, w = latent.shape
    x = latent.reshape(c, h // patch, patch, w // patch, patch)
    return x.permute(1, 3, 0, 2, 4).reshape((h // patch) * (w // patch), c * patch * patch)


@functools.lru_cache(maxsize=64)
def grid_coords(rows: int, cols: int) -> Tensor:
    """(rows * cols, 2) (row, col) of a patch grid in row-major order (shared: never modify it)."""
    rr, cc = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.stack([rr.reshape(-1), cc.reshape(-1)], dim=1)


def unpatchify(patches: Tensor, channels: int, height: int, width: int, patch: int) -> Tensor:
    """Inverse of `patchify`: (N, C*p*p) -> (C, H, W)."""
    gh, gw = height // patch, width // patch
    x = patches.reshape(gh, gw, channels, patch, patch)
    return x.permute(2, 0, 3, 1, 4).reshape(channels, height, width)


def image_positions(config: ModelConfig, seg: Tensor, pad: int) -> tuple[list[int], Tensor | None]:
    """What an image segment puts in `tokens` (`pad` for patches, the codes for a code grid) and its patches
    (None for codes), once checked against the model's image objective."""
    cfg, p = config, config.patch_size
    if cfg.image_tokens:
        if seg.is_floating_point():
            raise InvalidInput(f"image_objective tokens takes the code grids (h, w) of a VQ tokenizer, got a "
                               f"continuous latent {tuple(seg.shape)}: encode the images with a VQ model "
                               "(configs/vae/vq-tiny-32.yaml), or train with image_objective diffusion")
        codes = seg.reshape(-1)
        if codes.numel() and not 0 <= int(codes.min()) <= int(codes.max()) < cfg.codebook_size:
            raise InvalidInput(f"image codes in [{int(codes.min())}, {int(codes.max())}] outside the codebook "
                               f"[0, {cfg.codebook_size})")
        return codes.tolist(), None
    if not seg.is_floating_point():
        raise InvalidInput(f"image_objective diffusion takes continuous latents (C, H, W), got a code grid "
                           f"{tuple(seg.shape)} of a VQ tokenizer: train with image_objective tokens, or encode "
                           "the images with an AutoencoderKL")
    if seg.dim() != 3 or seg.shape[0] != cfg.latent_channels:
        raise InvalidInput(f"image latent must be ({cfg.latent_channels}, H, W), got {tuple(seg.shape)}")
    _, h, w = seg.shape
    if h % p or w % p:
        raise InvalidInput(f"image latent {h}x{w} is not divisible by patch_size {p}")
    return [pad] * ((h // p) * (w // p)), patchify(seg.detach().float(), p)


def assemble(rows: list[list[dict]], length: int, pad: int, text_modality: int, patch_dim: int,
             image_tokens: bool = False) -> Batch:
    """Laid-out samples, several per row where packed, as one batch of `length` positions per row (the
    per-position fields gathered in flat lists, then one tensor each)."""
    columns: dict[str, list[int]] = {k: [] for k in ("tokens", "modality", "positions", "doc_ids", "image_ids",
                                                     "targets", "image_targets")}
    patches, coords, image_sizes, image_first, shapes = [], [], [], [], []
    for docs in rows:
        used = 0
        for d, lay in enumerate(docs):
            n, first = len(lay["tokens"]), len(shapes)
            columns["tokens"] += lay["tokens"]
            columns["modality"] += lay["modality"]
            columns["targets"] += lay["targets"]
            columns["image_targets"] += lay["image_targets"]
            columns["positions"] += range(n)
            columns["doc_ids"] += [d] * n
            columns["image_ids"] += [k + first if k >= 0 else -1 for k in lay["image_local"]]
            patches += lay["patches"]  # tokens objective: none, the codes are in `tokens`
            for co, sh in zip(lay["coords"], lay["shapes"]):
                coords.append(co)
                image_sizes.append(co.shape[0])
                image_first.append(lay["image_first"])
                shapes.append(sh)
            used += n
        for key, fill in (("tokens", pad), ("modality", text_modality), ("positions", 0), ("doc_ids", -1),
                          ("image_ids", -1), ("targets", IGNORE_INDEX), ("image_targets", IGNORE_INDEX)):
            columns[key] += [fill] * (length - used)
    # through numpy: 4x faster than torch.tensor on a list of ints (~30 against ~130 us per column of 2k)
    t = {k: torch.from_numpy(np.array(v, dtype=np.int64)).view(len(rows), length) for k, v in columns.items()}
    inputs = ModelInputs(
        tokens=t["tokens"], modality=t["modality"], positions=t["positions"], doc_ids=t["doc_ids"],
        image_ids=t["image_ids"],
        patches=torch.cat(patches) if patches else torch.zeros(0, patch_dim),
        patch_coords=torch.cat(coords) if coords else torch.zeros(0, 2, dtype=torch.long),
        patch_image=torch.repeat_interleave(torch.arange(len(shapes)), torch.tensor(image_sizes, dtype=torch.long)),
        timesteps=torch.zeros(len(shapes)))
    return Batch(inputs, text_targets=t["targets"], image_first=torch.tensor(image_first, dtype=torch.bool),
                 image_shapes=shapes, image_targets=t["image_targets"] if image_tokens else None)


class Collator:
    """Lays out every sequence the model sees: training samples padded (one per row) or packed (rows up to a
    budget), held-out samples, the prefix a generation or captioning starts from and the positions it
    then runs (`collate_generation`, `collate_captioning`)."""

    def __init__(self, config: ModelConfig, specials: SpecialTokens | None = None,
                 max_len: int | None = None) -> None:
        self.config = config
        self.specials = specials or SpecialTokens.at_end_of_vocab(config.vocab_size)
        self.max_len = max_len or config.max_seq_len
        if self.max_len > config.max_seq_len:
            raise ValueError(f"collator max_len {self.max_len} exceeds the model's max_seq_len {config.max_seq_len}")
        self.text_modality = config.modalities.index("text")
        self.image_modality = config.modalities.index("image")
        self.patch = 1 if config.image_tokens else config.patch_size  # grid cells per image position (side)

    # -- one sample -> flat lists ------------------------------------------------------------------

    def _layout(self, sample: Sample) -> dict:
        sp, p = self.specials, self.patch
        tokens: list[int] = [] if sp.bos is None else [sp.bos]
        modality: list[int] = [self.text_modality] * len(tokens)
        image_local: list[int] = [-1] * len(tokens)
        patches, coords, shapes = [], [], []
        for seg in sample.segments:
            if is_image(seg):
                ids, patch_rows = image_positions(self.config, seg, sp.pad)
                h, w = seg.shape[-2:]
                k, n = len(shapes), len(ids)
                tokens += [sp.boi] + ids + [sp.eoi]
                modality += [self.text_modality] + [self.image_modality] * n + [self.text_modality]
                image_local += [-1] + [k] * n + [-1]
                if patch_rows is not None:
                    patches.append(patch_rows)
                coords.append(grid_coords(h // p, w // p))
                shapes.append(tuple(seg.shape))
            else:
                ids = seg.tolist() if isinstance(seg, Tensor) else list(seg)
                bad = [t for t in ids if not 0 <= int(t) < self.config.vocab_size]
                if bad:
                    raise InvalidInput(f"token id {bad[0]} outside the vocabulary [0, {self.config.vocab_size})")
                tokens += [int(t) for t in ids]
                modality += [self.text_modality] * len(ids)
                image_local += [-1] * len(ids)
        tokens.append(sp.eos)
        modality.append(self.text_modality)
        image_local.append(-1)
        # next-token targets: text only where the current and the next position are text; image codes where the
        # next position is a code (the last code predicts no EOI: an image always has its grid's length)
        targets = [IGNORE_INDEX] * len(tokens)
        image_targets = [IGNORE_INDEX] * len(tokens)
        for i in range(len(tokens) - 1):
            if modality[i + 1] == self.image_modality:
                image_targets[i] = tokens[i + 1] if self.config.image_tokens else IGNORE_INDEX
            elif modality[i] != self.image_modality:
                targets[i] = tokens[i + 1]
        return dict(tokens=tokens, modality=modality, image_local=image_local, targets=targets,
                    image_targets=image_targets, patches=patches, coords=coords, shapes=shapes,
                    image_first=sample.is_image_first())

    def _checked(self, lay: dict, limit: int | None = None, what: str = "the context") -> dict:
        limit = limit or self.max_len
        if len(lay["tokens"]) > limit:
            raise InvalidInput(f"sample has {len(lay['tokens'])} tokens (with special tokens and image patches), "
                               f"more than {what} of {limit}")
        return lay

    def layout_length(self, sample: Sample) -> int:
        """Positions the sample takes in a row: its text, image patches and special tokens (`_layout`'s
        length, counted without building it)."""
        p = self.patch
        n = 1 if self.specials.bos is None else 2  # EOS, and BOS where the tokenizer has one
        for seg in sample.segments:
            n += (seg.shape[-2] // p) * (seg.shape[-1] // p) + 2 if is_image(seg) else len(seg)
        return n

    def _prefix_layout(self, sample: Sample, with_image: bool) -> dict:
        """The sample's layout up to and including the BOI (or, `with_image`, the EOI) of its first image."""
        lay = self._layout(sample)
        if self.specials.boi not in lay["tokens"]:
            raise ValueError("a prefix ends at an image: the sample has none")
        boi = lay["tokens"].index(self.specials.boi)
        end = lay["tokens"].index(self.specials.eoi, boi) + 1 if with_image else boi + 1
        cut = {k: lay[k][:end] for k in ("tokens", "modality", "image_local", "targets", "image_targets")}
        images = {k: lay[k][:1] if with_image else [] for k in ("patches", "coords", "shapes")}
        if not with_image:  # the BOI predicts the first code of an image the prefix does not hold
            cut["image_targets"] = cut["image_targets"][:-1] + [IGNORE_INDEX]
        return self._checked({**lay, **cut, **images})

    # -- rows -> batch -----------------------------------------------------------------------------

    def _assemble(self, rows: list[list[dict]], length: int) -> Batch:
        return assemble(rows, length, self.specials.pad, self.text_modality, self.config.patch_dim,
                        self.config.image_tokens)

    def collate_padded(self, samples: Sequence[Sample], pad_to: int | None = None) -> Batch:
        """One sample per row, right-padded to the longest (or `pad_to`)."""
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        layouts = [self._checked(self._layout(s)) for s in samples]
        length = pad_to or max(len(lay["tokens"]) for lay in layouts)
        if length < max(len(lay["tokens"]) for lay in layouts):
            raise ValueError(f"pad_to={pad_to} is shorter than the longest sample")
        return self._assemble([[lay] for lay in layouts], length)

    def collate_prefix(self, samples: Sequence[Sample], with_image: bool = False) -> Batch:
        """Each sample laid out up to and including the BOI of its first image, one per row, right-padded:
        what generation conditions on (`BOS caption BOI`; the patches that follow are what a sampler denoises,
        the latent in the sample only fixes their shape). `with_image`: up to and including the image's EOI,
        the prompt of captioning (`BOS BOI patches EOI`, text follows)."""
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        layouts = [self._prefix_layout(s, with_image) for s in samples]
        return self._assemble([[lay] for lay in layouts], max(len(lay["tokens"]) for lay in layouts))

    def placeholder(self, image_shape: tuple[int, ...]) -> Tensor:
        """An image segment of this shape whose content a sampler fills: a zero latent (C, H, W) or a zero
        code grid (h, w)."""
        return torch.zeros(image_shape, dtype=torch.long if self.config.image_tokens else torch.float32)

    def collate_generation(self, captions: Sequence[Sequence[int]], image_shape: tuple[int, ...]
                           ) -> tuple[Batch, ModelInputs]:
        """What text -> image runs with a KV cache: the prefix `BOS caption BOI` of each row (right-padded), and
        the N image positions that follow each row's own prefix, with zero patches and timesteps (a sampler
        sets them at every step) or zero codes (a sampler writes them one by one). Together they are
        `collate_padded`'s layout of (caption, image). `image_shape`: a latent's (C, H, W) or a code grid's (h, w)."""
        prefix = self.collate_prefix([Sample([list(c), self.placeholder(image_shape)]) for c in captions])
        rows, p = len(captions), self.patch
        grid = (image_shape[-2] // p, image_shape[-1] // p)
        n = grid[0] * grid[1]
        lengths = (prefix.inputs.doc_ids >= 0).sum(dim=1)
        patches = torch.zeros(0 if self.config.image_tokens else rows * n, self.config.patch_dim)
        image = ModelInputs(
            tokens=torch.full((rows, n), 0 if self.config.image_tokens else self.specials.pad, dtype=torch.long),
            modality=torch.full((rows, n), self.image_modality, dtype=torch.long),
            positions=lengths[:, None] + torch.arange(n),  # the patches follow the BOI
            doc_ids=torch.zeros((rows, n), dtype=torch.long), image_ids=torch.zeros((rows, n), dtype=torch.long),
            patches=patches, patch_coords=grid_coords(*grid).repeat(rows, 1),
            patch_image=torch.arange(rows).repeat_interleave(n), timesteps=torch.zeros(rows))
        return prefix, image

    def collate_captioning(self, images: Sequence[Tensor], room: int) -> ModelInputs:
        """What image -> text runs: `BOS BOI patches EOI` of each clean image (timestep 0), then `room` positions
        of its document for the caption (pad tokens until a decoder writes them)."""
        if len({tuple(img.shape) for img in images}) > 1:
            raise ValueError("collate_captioning takes images of one latent shape (their prompts are one length)")
        prompt = self.collate_prefix([Sample([img], image_first=True) for img in images], with_image=True).inputs
        rows, length = prompt.tokens.shape
        total = length + room

        def extended(t: Tensor, fill: int) -> Tensor:
            out = torch.full((rows, total), fill, dtype=t.dtype)
            out[:, :length] = t
            return out

        return replace(prompt, tokens=extended(prompt.tokens, self.specials.pad),
                       modality=extended(prompt.modality, self.text_modality),
                       positions=torch.arange(total).expand(rows, total).clone(),
                       doc_ids=torch.zeros((rows, total), dtype=torch.long), image_ids=extended(prompt.image_ids, -1))

    def collate_packed(self, samples: Sequence[Sample], token_budget: int | None = None) -> Batch:
        """Several samples per row, each row at most `token_budget` tokens (default: max_len).

        First-fit in the given order, so the packing is deterministic; every row is padded to the budget,
        which keeps shapes static (good for torch.compile and FlexAttention block masks).
        """
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        budget = token_budget or self.max_len
        if budget > self.max_len:
            raise ValueError(f"token_budget {budget} exceeds the context of {self.max_len}")
        rows: list[list[dict]] = []
        used: list[int] = []
        for sample in samples:
            lay = self._checked(self._layout(sample), budget, "the packing budget")
            n = len(lay["tokens"])
            for r in range(len(rows)):
                if used[r] + n <= budget:
                    rows[r].append(lay)
                    used[r] += n
                    break
            else:
                rows.append([lay])
                used.append(n)
        return self._assemble(rows, budget)
