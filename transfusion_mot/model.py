"""Transfusion on a Mixture-of-Transformers backbone, top to bottom in one file.

One sequence interleaves text tokens and VAE-latent image patches. Every layer runs ONE global
self-attention over the whole sequence, but each token is processed by the weights of its own modality:
Q/K/V/O projections, SwiGLU FFN and RMSNorms are copied per modality as `ModelConfig.untie` says
(arXiv 2411.04996, Eq. 2). Routing is deterministic by modality: no router, no load balancing. With
`image_objective: tokens` (the Chameleon setting) an image is instead the code grid of a VQ tokenizer: each
code one position, read through its own embedding and predicted by its own head; the backbone and its
per-modality untying are unchanged.

Routing scheme. Tokens of a batch are sorted by modality once per forward (a stable argsort of the
flattened modality ids), and the residual stream is held as one tensor per modality, its parts: every
per-modality op is a plain dense op on its modality's part, with no split or cat around it, and the residual
adds go part by part. Only attention needs the original layout (for the mask, RoPE and the (batch, seq)
shape): per layer the fused QKV of the parts are joined and un-sorted (a cat and an index_select), and the
attention output is sorted back into parts (an index_select per modality). Padding never enters the stream,
so no layer computes it. Gathering per projection (~7 per layer), computing every expert on every token and
selecting, (on CPU) grouped GEMMs, and one sorted tensor split and concatenated around every op were all
slower. With nothing untied and no padding the permutation is skipped altogether, so the dense baseline runs
the same modules on one part with no routing overhead.

KV cache. A position's keys and values depend only on positions it can see, and under the causal mask
those are never later positions. So keys/values of a prefix (a caption before its image, an image before
its caption, text decoded so far) can be computed once (`KVCache`) and a later chunk of positions run alone
against them: exact, and far cheaper when the chunk is short (sampling.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .batch import ModelInputs
from .common.config import load_yaml_config, save_yaml_config
from .common.tensors import copy_full_into, local_tensor
from .config import ModelConfig
from .masks import AttentionMask, resolve_backend, transfusion_mask_mod

MODEL_CONFIG_FILE = "model_config.yaml"
MODEL_WEIGHTS_FILE = "model.safetensors"

# --------------------------------------------------------------------------------------------------
# routing


def gather_rows(parts: Sequence[Tensor], indices: Sequence[Tensor], pad: bool = False) -> list[Tensor]:
    """Rows `indices[i]` of the parts' rows one after the other, one tensor for each i; with `pad`, zero rows
    follow the parts' up to the indices' total length (one copy for both)."""
    x = Routing.join(parts, sum(i.shape[0] for i in indices) if pad else None)
    return [x.index_select(0, i) for i in indices]


class RowGather(torch.autograd.Function):
    """`gather_rows([x], indices)` whose backward is the inverse gather, `gather_rows(grads, [back], back_pad)`:
    for the stream's sort and un-sort, which are (padding aside) permutations. index_select's own backward is
    a scatter-add into zeros: slower eager, and serial atomic adds once inductor compiles it on a CPU. Reverse
    mode only (no jvp or vmap rule): torch.func transforms of the model would need one."""

    @staticmethod
    def forward(ctx, x: Tensor, back: Tensor, back_pad: bool, *indices: Tensor) -> tuple[Tensor, ...]:
        ctx.save_for_backward(back)
        ctx.back_pad = back_pad
        return tuple(gather_rows([x], indices))

    @staticmethod
    def backward(ctx, *grads: Tensor) -> tuple[Tensor | None, ...]:
        (back,) = ctx.saved_tensors
        return (gather_rows(grads, [back], ctx.back_pad)[0], None, None, *([None] * len(grads)))


def permute_rows(x: Tensor, indices: Sequence[Tensor], back: Tensor, back_pad: bool) -> list[Tensor]:
    """`gather_rows([x], indices)`: each of `indices` gives its own tensor (not views of one: a compiled block
    then gets inputs of one kind at every layer). Through `RowGather` when x needs a gradient (sampling,
    evaluation and integer targets take the plain gather: no backward to arrange)."""
    if not x.requires_grad:
        return gather_rows([x], indices)
    return list(RowGather.apply(x, back, back_pad, *indices))


class Routing:
    """The residual stream of one forward: the real (non-padding) tokens of a batch, as one part per modality
    when `sort` (part m holds modality m's tokens in row-major order), else as a single part. Every op but
    attention runs on each part with that modality's expert, so the parts are never joined in between (no
    split and cat around each op); attention un-sorts them into the (batch, seq) layout and sorts its output
    back. Padding positions are dropped from the stream, so no layer computes them: attention gets zeros
    there (a padding query sees only its own, zero, key: its output is finite and never used)."""

    def __init__(self, modality: Tensor, num_modalities: int, sort: bool, padding: Tensor | None = None) -> None:
        flat = modality.reshape(-1)
        self.modality = modality  # (B, L): the original layout's
        self._one_hot: Tensor | None = None
        self._part_rows: list[Tensor] = []  # each part's flattened positions, in stream order
        # stream row i is flattened position _permutation[i]; the padding positions follow the real ones
        self._permutation: Tensor | None = None
        self.inverse: Tensor | None = None  # flattened position p -> its row in the stream (None: all, in order)
        self.padded = False  # padding positions exist (they follow the real tokens in `inverse`)
        self.counts: list[int] = []  # tokens per part, one part per modality when sorted (else empty)
        if not sort and padding is None:
            return
        # padding sorts after every modality; one host sync per batch gives every count
        key = flat if padding is None else torch.where(padding.reshape(-1), num_modalities, flat)
        counts = torch.bincount(key, minlength=num_modalities + 1).tolist()
        real, self.padded = sum(counts[:num_modalities]), counts[num_modalities] > 0
        if not sort and not self.padded:
            return
        if sort:
            self.counts = counts[:num_modalities]
            self._one_hot = F.one_hot(flat, num_modalities).float()  # (B*L, M), for `norm_in_place`
        permutation = torch.argsort(key if sort else (key == num_modalities).int(), stable=True)
        order = permutation[:real]
        self._part_rows = list(order.split(self.counts)) if sort else [order]
        self._permutation = permutation
        self.inverse = torch.empty_like(permutation)
        self.inverse[permutation] = torch.arange(flat.numel(), device=flat.device)

    @staticmethod
    def join(parts: Sequence[Tensor], rows: int | None = None) -> Tensor:
        """The parts' rows one after the other, then zero rows up to `rows` rows when given: one tensor, a
        copy unless it is a single part. Without gradients, empty parts (absent modalities: a denoising step
        holds image tokens only) are left out, so a single part with rows is used as it is; with them, every
        part stays in, so that an absent modality's experts get a zero gradient (`apply`)."""
        if len(parts) > 1 and not torch.is_grad_enabled():
            parts = [part for part in parts if part.shape[0]] or parts[:1]
        real = sum(part.shape[0] for part in parts)
        if rows is not None and rows > real:
            parts = [*parts, parts[0].new_zeros(rows - real, *parts[0].shape[1:])]
        return parts[0] if len(parts) == 1 else torch.cat(list(parts))

    def sort(self, x: Tensor) -> list[Tensor]:
        """(B*L, ...) in original row-major order -> the stream's parts."""
        if self.inverse is None:
            return [x]
        return permute_rows(x, self._part_rows, self.inverse, self.padded)

    def unsort(self, parts: Sequence[Tensor]) -> Tensor:
        """The stream's parts -> (B*L, ...) in original order, zeros at padding positions."""
        if self.inverse is None:
            return self.join(parts)
        # one copy for the parts and the padding's zero rows; the backward gathers every row of that copy
        x = self.join(parts, self.inverse.shape[0] if self.padded else None)
        return permute_rows(x, [self.inverse], self._permutation, False)[0]

    def by_modality(self, parts: Sequence[Tensor], modalities: int) -> list[Tensor]:
        """Each modality's rows of the stream's parts, in original row-major order: the parts themselves when
        sorted, else boolean selections of the single part."""
        if self.counts:
            return list(parts)
        (stream_modality,) = self.sort(self.modality.reshape(-1))
        return [parts[0][stream_modality == m] for m in range(modalities)]

    def apply(self, experts: Experts, parts: Sequence[Tensor]) -> list[Tensor]:
        """experts[m] on part m of the stream; a single (shared) expert runs on every part. In training an
        expert whose modality is absent still runs, on zero rows: its gradient is then zero rather than
        missing, so under FSDP2 every process reduces the same gradients whatever its micro-batch holds (a
        text-only micro-batch on one rank). Without gradients (sampling: a denoising step holds image tokens
        only) an empty part's expert is not run: its output is an empty tensor of the experts' width."""
        if len(experts) > 1 and len(experts) != len(parts):
            raise ValueError(f"{len(experts)} experts for a stream of {len(parts)} parts")
        every = torch.is_grad_enabled()
        chosen = experts if len(experts) > 1 else [experts[0]] * len(parts)
        return [expert(part) if every or part.shape[0] else part.new_empty(0, experts.width)
                for expert, part in zip(chosen, parts)]

    def norm_in_place(self, norms: Sequence[nn.RMSNorm], x: Tensor) -> Tensor:
        """norms[m] (RMSNorms over the last dim) on the tokens of modality m, for `x` in the original
        (batch, seq, ...) layout (q and k after attention's un-sort): one weightless norm, times each token's
        own modality's weights."""
        if len(norms) == 1:
            return norms[0](x)
        if self._one_hot is None:
            raise ValueError("per-modality norms need a modality-sorted stream (Routing with sort=True)")
        with torch.autocast(x.device.type, enabled=False):  # each position's weight row: a matmul, and so its backward
            weight = self._one_hot @ torch.stack([norm.weight.float() for norm in norms])  # (B*L, d)
        weight = weight.view(*self.modality.shape, *([1] * (x.dim() - self.modality.dim() - 1)), -1)
        eps = torch.finfo(x.dtype).eps if norms[0].eps is None else norms[0].eps
        return RMSNormFunction.apply(x, None, eps) * weight


class Experts(nn.ModuleList):
    """Per-modality copies of one module (index = modality id), or a single shared copy. `width`: the last
    dim of their outputs (an expert `Routing.apply` does not run gives an empty tensor of that width)."""

    def __init__(self, modules: Iterable[nn.Module], width: int) -> None:
        super().__init__(modules)
        self.width = width


def experts(config: ModelConfig, group: str, width: int, make) -> Experts:
    """One module per modality when `group` is untied, else one shared module; `width` is their output's."""
    n = config.num_modalities if config.untied(group) else 1
    return Experts([make() for _ in range(n)], width)


# --------------------------------------------------------------------------------------------------
# position encodings


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> Tensor:
    """Inverse frequencies (head_dim/2,) of RoPE, with Llama-3's rule for long contexts when `scaling` says
    rope_type llama3: wavelengths longer than original_max_position_embeddings / low_freq_factor are
    stretched by `factor`, shorter than ... / high_freq_factor kept, the band between interpolated."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None or scaling.get("rope_type", scaling.get("type")) in (None, "default"):
        return inv_freq
    factor, low, high = float(scaling["factor"]), float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    context = float(scaling["original_max_position_embeddings"])
    wavelength = 2 * math.pi / inv_freq
    stretched = torch.where(wavelength > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelength - low) / (high - low)
    blended = (1 - smooth) * stretched / factor + smooth * stretched
    between = (wavelength >= context / high) & (wavelength <= context / low)
    return torch.where(between, blended, stretched)


def rope_tables(positions: Tensor, head_dim: int, theta: float, scaling: dict | None = None) -> tuple[Tensor, Tensor]:
    """cos/sin of shape (B, L, 1, head_dim/2) for integer sequence positions (B, L)."""
    inv_freq = rope_frequencies(head_dim, theta, scaling).to(positions.device)
    angles = positions.float()[..., None] * inv_freq
    return angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]


class RotaryFunction(torch.autograd.Function):
    """`apply_rope` as one autograd node that writes both halves of its output, and of its gradient, into one
    buffer: the composite's cat, its chunk's backward cat and their ~10 autograd nodes are ~2% of a tiny
    model's eager step on a CPU. The rotation is orthogonal, so the backward is the inverse rotation.
    Reverse mode only (no jvp or vmap rule)."""

    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        y = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        y1, y2 = y.chunk(2, dim=-1)
        torch.mul(x1, cos, out=y1).addcmul_(x2, sin, value=-1)  # x1 cos - x2 sin
        torch.mul(x1, sin, out=y2).addcmul_(x2, cos)  # x1 sin + x2 cos
        ctx.save_for_backward(cos, sin)
        ctx.dtype = x.dtype
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        g1, g2 = grad.float().chunk(2, dim=-1)
        dx = torch.empty(grad.shape, dtype=torch.float32, device=grad.device)
        dx1, dx2 = dx.chunk(2, dim=-1)
        torch.mul(g1, cos, out=dx1).addcmul_(g2, sin)  # g1 cos + g2 sin
        torch.mul(g2, cos, out=dx2).addcmul_(g1, sin, value=-1)  # g2 cos - g1 sin
        return dx.to(ctx.dtype), None, None


def rope_composite(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """`apply_rope` as plain ops (what `RotaryFunction` computes)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x[..., :d/2], x[..., d/2:]) (the Llama/NeoX convention), in fp32. x: (B, L, H, d).
    Compiled, the composite runs: inductor fuses it into one kernel (and fails on the eager function's
    in-place writes into views: a recursion error in torch 2.14)."""
    if torch.compiler.is_compiling():
        return rope_composite(x, cos, sin)
    return RotaryFunction.apply(x, cos, sin)


def sincos_2d(coords: Tensor, dim: int) -> Tensor:
    """Fixed 2D sin-cos embedding (MAE/DiT) of patch (row, col) coordinates (P, 2) -> (P, dim)."""
    if dim % 4:
        raise ValueError(f"2D sin-cos position embedding needs dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, device=coords.device, dtype=torch.float64) / quarter)
    rows = coords[:, 0:1].double() * omega
    cols = coords[:, 1:2].double() * omega
    return torch.cat([rows.sin(), rows.cos(), cols.sin(), cols.cos()], dim=1).float()


def timestep_frequencies(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of (possibly fractional) diffusion timesteps in [0, T]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


class TimestepEmbedder(nn.Module):
    """Diffusion timestep -> model width, added to every patch of the image (DiT's embedder)."""

    def __init__(self, dim: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_frequencies(t, self.freq_dim))


class ImageModulation:
    """adaLN-Zero for the image tokens of one forward (time_conditioning: adaln; DiT, arXiv 2212.09748).

    With adaLN the residual stream is always modality-sorted, so the image tokens are one part of it
    (`image_part`), in patch order; `cond` is SiLU of each image's timestep embedding, (I, D), and `patch_image`
    maps a patch to its image. Text tokens are never modulated, so text computes exactly what it would
    without this."""

    def __init__(self, image_part: int, cond: Tensor, patch_image: Tensor) -> None:
        self.image_part = image_part
        self.cond = cond
        self.patch_image = patch_image

    def params(self, linear: nn.Linear, n: int) -> list[Tensor]:
        """`linear` applied once per image, then gathered per image token and split into n (N_img, D)."""
        return list(linear(self.cond)[self.patch_image].chunk(n, dim=-1))

    def _on_images(self, parts: list[Tensor], fn) -> list[Tensor]:
        parts, i = list(parts), self.image_part
        parts[i] = fn(parts[i]).to(parts[i].dtype)
        return parts

    def modulate(self, parts: list[Tensor], shift: Tensor, scale: Tensor) -> list[Tensor]:
        return self._on_images(parts, lambda rows: rows * (1 + scale) + shift)

    def gate(self, parts: list[Tensor], gate: Tensor) -> list[Tensor]:
        return self._on_images(parts, lambda rows: rows * gate)


# --------------------------------------------------------------------------------------------------
# KV cache


@dataclass
class LayerKV:
    """One layer's cached keys and values, (B, H, L_cached, head_dim), after QK-norm and RoPE, and optionally
    `room`: buffers that hold them followed by space for the N positions of chunks that do not extend the
    cache."""

    k: Tensor | None = None
    v: Tensor | None = None
    room: tuple[Tensor, Tensor] | None = None  # each (B, H, L_cached + N, head_dim); k and v are views of it

    def extend(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Cached keys/values followed by the chunk's (the chunk's queries attend to all of them); kept."""
        if self.k is not None:
            k, v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        self.k, self.v, self.room = k, v, None
        return k, v

    def reserve(self, n: int) -> None:
        """Room for chunks of n positions that read the cache without extending it (`transient`). The cache
        then lives at the front of the room (no second copy of it is kept)."""
        if self.k is None:
            raise ValueError("the KV cache is empty: run a prefix into it before reserving room after it")
        length = self.k.shape[2]
        self.room = tuple(torch.cat([t, t.new_empty(*t.shape[:2], n, t.shape[3])], dim=2) for t in (self.k, self.v))
        self.k, self.v = self.room[0][:, :, :length], self.room[1][:, :, :length]

    def transient(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Cached keys/values followed by the chunk's, for this forward only: written into the reserved room
        when it fits (the next such chunk overwrites them), where a cat would copy the whole cache, per layer,
        at every denoising step. For inference only: autograd refuses a backward through overwritten room."""
        if self.room is None or self.room[0].shape[2] != self.k.shape[2] + k.shape[2]:
            return torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        room_k, room_v = self.room
        room_k[:, :, self.k.shape[2]:], room_v[:, :, self.k.shape[2]:] = k, v
        # viewed with the chunk's batch, heads and head size: compiled, the room's own sizes are free symbols
        # (a grouped-query test on them would break the graph)
        batch, heads, _, head_dim = k.shape
        return room_k.view(batch, heads, -1, head_dim), room_v.view(batch, heads, -1, head_dim)


@dataclass
class TransientKV:
    """A layer's cache as a chunk that does not extend it uses it (`LayerKV.transient`)."""

    layer: LayerKV

    def extend(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.layer.transient(k, v)


@dataclass
class KVCache:
    """Keys/values of earlier positions, per layer, plus their doc_ids/image_ids (B, L_cached) for the mask.

    Start with `KVCache.empty(...)` and run the prefix with `extend_cache=True`; later chunks either extend
    it (decoded text) or only read it (`extend_cache=False`: diffusion steps, whose image tokens change at
    every step; `reserve(N)` first gives their keys/values room after the cache's). Image ids must not
    repeat between cached and new positions of a row.
    """

    layers: list[LayerKV]
    doc_ids: Tensor
    image_ids: Tensor

    @classmethod
    def empty(cls, n_layers: int, batch: int, device: torch.device | str | None = None) -> KVCache:
        none = torch.zeros(batch, 0, dtype=torch.long, device=device)
        return cls([LayerKV() for _ in range(n_layers)], none, none.clone())

    def __len__(self) -> int:
        return self.doc_ids.shape[1]

    def reserve(self, n: int) -> None:
        """Room after the cached positions for chunks of n positions that do not extend the cache (diffusion
        steps): their keys/values are written there instead of concatenated to a copy of the cache."""
        for layer in self.layers:
            layer.reserve(n)

    def ids_with(self, doc_ids: Tensor, image_ids: Tensor, n_layers: int, max_seq_len: int) -> tuple[Tensor, Tensor]:
        """The cached positions' doc_ids and image_ids followed by a chunk's (B, L), once the chunk is checked
        to fit: same rows, a model of as many layers, within max_seq_len."""
        batch, seq = doc_ids.shape
        if self.doc_ids.shape[0] != batch or len(self.layers) != n_layers:
            raise ValueError(f"KV cache holds {self.doc_ids.shape[0]} rows and {len(self.layers)} layers, "
                             f"the chunk has {batch} rows and the model {n_layers} layers")
        if len(self) + seq > max_seq_len:
            raise ValueError(f"{len(self)} cached + {seq} new positions exceed max_seq_len {max_seq_len}")
        return torch.cat([self.doc_ids, doc_ids], dim=1), torch.cat([self.image_ids, image_ids], dim=1)


# --------------------------------------------------------------------------------------------------
# the MoT block


class RMSNormFunction(torch.autograd.Function):
    """y = x / rms(x) * weight over the last dim, computed in fp32, with its backward written out: one autograd
    node of ~9 ops where the composite (pow, mean, add, rsqrt, mul, mul) records 6 nodes and ~14 ops; on a
    CPU, where a tiny model's step is mostly such small ops, that is a few percent of the step. Eagerly, an
    fp32 input saves the normalised x (the same size as x), which the backward then need not recompute
    (~3% of a tiny MoT's eager step); a narrower input (bf16 under autocast) saves x, in half the memory.
    Compiled, x is saved: the fused kernel would otherwise write the normalised x out as one more buffer."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
        xf = x.float()
        rstd = xf.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
        xhat = xf * rstd
        keep = x.dtype == torch.float32 and not torch.compiler.is_compiling()
        ctx.save_for_backward(xhat if keep else x, rstd, weight)
        ctx.dtype, ctx.saved_normalised = x.dtype, keep
        return (xhat if weight is None else xhat * weight).to(x.dtype)  # as nn.RMSNorm: fp32 inside, the input's dtype out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        saved, rstd, weight = ctx.saved_tensors
        xhat = saved if ctx.saved_normalised else saved.float() * rstd
        grad = grad.float()
        g = grad if weight is None else grad * weight  # gradient w.r.t. the normalised x
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:  # (g - xhat mean(g xhat)) rstd
            grad_x = torch.addcmul(g, xhat, (g * xhat).mean(-1, keepdim=True), value=-1).mul_(rstd).to(ctx.dtype)
        if weight is not None and ctx.needs_input_grad[1]:
            grad_w = (grad * xhat).reshape(-1, grad.shape[-1]).sum(0).to(weight.dtype)
        return grad_x, grad_w, None


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm (same parameters and state dict) through `RMSNormFunction`."""

    def forward(self, x: Tensor) -> Tensor:
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        return RMSNormFunction.apply(x, self.weight, eps)


class SwiGLUFunction(torch.autograd.Function):
    """silu(gate) * up of a fused (..., 2F) gate_up projection, as one autograd node whose backward writes the
    gate's and the up half's gradients into one buffer: the composite's chunk backward is a cat of the whole
    (N, 2F) gradient, ~2% of a tiny model's eager step on a CPU. Saves what the composite saves (the
    projection and silu(gate)). Reverse mode only (no jvp or vmap rule)."""

    @staticmethod
    def forward(ctx, gate_up: Tensor) -> Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate)
        ctx.save_for_backward(gate_up, act)
        return act * up

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        gate_up, act = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        grad_in = torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)
        grad_gate, grad_up = grad_in.chunk(2, dim=-1)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=grad_gate)
        torch.mul(grad, act, out=grad_up)
        return grad_in


def swiglu_composite(gate_up: Tensor) -> Tensor:
    """`swiglu` as plain ops (what `SwiGLUFunction` computes)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu(gate_up: Tensor) -> Tensor:
    """silu(gate) * up for gate_up = (gate, up) on the last dim; compiled, the composite (inductor fuses it)."""
    if torch.compiler.is_compiling():
        return swiglu_composite(gate_up)
    return SwiGLUFunction.apply(gate_up)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)  # w1 and w3 fused: one matmul
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(swiglu(self.gate_up(x)))


class MoTAttention(nn.Module):
    """Per-modality Q/K/V/O (and QK-norm) around one global attention over the whole sequence.
    Grouped-query attention when n_kv_heads < n_heads: query head j reads key/value head j // (H / KV)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.kv_heads, config.head_size
        d, width = config.dim, (config.n_heads + 2 * config.kv_heads) * config.head_size
        self.qkv = experts(config, "attn", width, lambda: nn.Linear(d, width, bias=config.qkv_bias))
        self.out = experts(config, "attn", d, lambda: nn.Linear(config.n_heads * config.head_size, d,
                                                                 bias=config.out_bias))
        if config.qk_norm:
            hd, eps = config.head_size, config.norm_eps
            self.q_norm = experts(config, "norm", hd, lambda: RMSNorm(hd, eps=eps))
            self.k_norm = experts(config, "norm", hd, lambda: RMSNorm(hd, eps=eps))
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: list[Tensor], routing: Routing, shape: tuple[int, int], rope: tuple[Tensor, Tensor],
                mask: AttentionMask, kv: LayerKV | TransientKV | None = None) -> list[Tensor]:
        batch, seq = shape
        h, kvh, hd = self.n_heads, self.n_kv_heads, self.head_dim
        # projected in the stream, then back to the (batch, seq) layout for RoPE and the global attention;
        # a shared projection runs once, on the parts joined (attention joins them anyway)
        parts = [self.qkv[0](routing.join(x))] if len(self.qkv) == 1 else routing.apply(self.qkv, x)
        qkv = routing.unsort(parts).view(batch, seq, -1)
        q, k, v = qkv.split([h * hd, kvh * hd, kvh * hd], dim=-1)
        q, k, v = q.unflatten(-1, (h, hd)), k.unflatten(-1, (kvh, hd)), v.unflatten(-1, (kvh, hd))
        if self.q_norm is not None:
            q, k = routing.norm_in_place(self.q_norm, q), routing.norm_in_place(self.k_norm, k)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if kv is not None:  # earlier positions' keys/values come first
            k, v = kv.extend(k, v)
        y = mask.attend(q, k, v)  # (B, H, L, hd)
        y = routing.sort(y.transpose(1, 2).reshape(batch * seq, h * hd))
        return routing.apply(self.out, y)


class MoTBlock(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, eps = config.dim, config.norm_eps
        self.pre_norm = config.norm_placement == "pre"
        self.attn_norm = experts(config, "norm", d, lambda: RMSNorm(d, eps=eps))
        self.attn = MoTAttention(config)
        self.ffn_norm = experts(config, "norm", d, lambda: RMSNorm(d, eps=eps))
        self.ffn = experts(config, "ffn", d, lambda: SwiGLU(d, config.ffn_dim))
        # adaLN-Zero of the image tokens: shift, scale, gate for attention and for the FFN
        self.modulation = nn.Linear(d, 6 * d) if config.time_conditioning == "adaln" else None

    def forward(self, x: list[Tensor], routing: Routing, shape: tuple[int, int], rope: tuple[Tensor, Tensor],
                mask: AttentionMask, kv: LayerKV | TransientKV | None = None,
                mod: ImageModulation | None = None) -> list[Tensor]:
        # x: the residual stream's parts, (N_m, D) for modality m (one part when nothing is untied)
        if mod is not None:  # pre-norm with the image rows modulated by their timestep
            shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = mod.params(self.modulation, 6)
            h = mod.modulate(routing.apply(self.attn_norm, x), shift_a, scale_a)
            x = plus(x, mod.gate(self.attn(h, routing, shape, rope, mask, kv), gate_a))
            h = mod.modulate(routing.apply(self.ffn_norm, x), shift_f, scale_f)
            return plus(x, mod.gate(routing.apply(self.ffn, h), gate_f))
        if self.pre_norm:  # x + f(norm(x))
            x = plus(x, self.attn(routing.apply(self.attn_norm, x), routing, shape, rope, mask, kv))
            return plus(x, routing.apply(self.ffn, routing.apply(self.ffn_norm, x)))
        # the MoT paper's Eq. 2: x + norm(f(x))
        x = plus(x, routing.apply(self.attn_norm, self.attn(x, routing, shape, rope, mask, kv)))
        return plus(x, routing.apply(self.ffn_norm, routing.apply(self.ffn, x)))


def plus(x: list[Tensor], y: list[Tensor]) -> list[Tensor]:
    """The residual addition, part by part."""
    return [a + b for a, b in zip(x, y)]


# --------------------------------------------------------------------------------------------------
# the model


class TransfusionMoT(nn.Module):
    """Text and image ends around a stack of MoT blocks. A plain nn.Module: parallelism, compile and
    activation checkpointing are applied from outside (transfusion_mot.training.parallel)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        # the modules' own default initialisation must not move the RNG that reset_parameters draws from: a
        # model's weights then depend on the seed and its parameter shapes only, so a dense model and a MoT
        # with copied experts built from one seed share their draws, and so does a model built on the meta
        # device and initialised later (FSDP2)
        rng = torch.get_rng_state()
        self.config = config
        self.image_modality = config.modalities.index("image")
        self.text_modality = config.modalities.index("text")
        d = config.dim
        base = config.base_vocab_size or config.vocab_size
        # started from a pretrained LM (base_vocab_size): its rows, then this format's own tokens as separate
        # parameters, so that freezing the LM's vocabulary leaves BOI/EOI trainable
        self.tok_embed = nn.Embedding(base, d)
        self.new_tok_embed = nn.Embedding(config.vocab_size - base, d) if base < config.vocab_size else None
        # the image end: diffusion reads latent patches at a timestep, tokens read VQ codes (Chameleon)
        tokens = config.image_tokens
        self.patch_embed = None if tokens else nn.Linear(config.patch_dim, d)  # linear patchify: patch -> width
        self.time_embed = None if tokens else TimestepEmbedder(d)
        self.code_embed = nn.Embedding(config.codebook_size, d) if tokens else None
        self.blocks = nn.ModuleList([MoTBlock(config) for _ in range(config.n_layers)])
        self.final_norm = experts(config, "norm", d, lambda: RMSNorm(d, eps=config.norm_eps))
        # adaLN: shift and scale of the image tokens after the final norm (DiT's final layer)
        self.final_modulation = nn.Linear(d, 2 * d) if config.time_conditioning == "adaln" else None
        untied_head = not config.tie_embeddings
        self.lm_head = nn.Linear(d, base, bias=False) if untied_head else None  # tied: the token embedding
        self.new_lm_head = nn.Linear(d, config.vocab_size - base, bias=False) if untied_head and base < config.vocab_size else None
        self.image_head = None if tokens else nn.Linear(d, config.patch_dim)  # width -> patch (epsilon or velocity)
        self.code_head = nn.Linear(d, config.codebook_size, bias=False) if tokens else None  # width -> next code
        torch.set_rng_state(rng)
        self.reset_parameters()

    # -- initialisation ----------------------------------------------------------------------------

    def reset_parameters(self) -> None:
        """Normal(0, init_std) for linear and embedding weights, zero biases, unit norms; the image head and
        the adaLN modulations start at zero (DiT). Each value is drawn whole on the CPU from the global RNG,
        in module order, and copied in: a parameter sharded by FSDP2 keeps its own shard (meta-device
        initialisation), so a sharded model gets the weights an unsharded one built the same way gets.

        With `config.copy_experts`, only the text experts are drawn and every other modality's experts get
        the same values: the draws are then exactly the dense model's (same seed, nothing untied), so such a
        MoT computes the dense model's function at step 0."""
        std = self.config.init_std
        zero = [m for m in [self.image_head, *(blk.modulation for blk in self.blocks), self.final_modulation]
                if m is not None]
        zero_ids = {id(p) for m in zero for p in m.parameters()}
        twins = {id(p): text for p, text in expert_twins(self)} if self.config.copy_experts else {}
        drawn: dict[int, Tensor] = {}
        for module in self.modules():
            for name, param in module.named_parameters(recurse=False):
                if id(param) in twins:
                    continue
                if isinstance(module, (nn.Linear, nn.Embedding)) and name == "weight":
                    value = torch.empty(param.shape).normal_(std=std)  # drawn even when zeroed: same RNG stream
                    if id(param) in zero_ids:
                        value.zero_()
                elif isinstance(module, nn.RMSNorm):
                    value = torch.ones(param.shape)
                else:
                    value = torch.zeros(param.shape)
                copy_full_into(param, value)
                drawn[id(param)] = value
        for module in self.modules():
            for param in module.parameters(recurse=False):
                if id(param) in twins:
                    copy_full_into(param, drawn[id(twins[id(param)])])

    def attention_backend(self, device: torch.device) -> str:
        return resolve_backend(self.config.attn_backend, device)

    def embed_tokens(self, ids: Tensor) -> Tensor:
        """(N,) token ids -> (N, D); ids past a pretrained vocabulary read the appended rows."""
        if self.new_tok_embed is None:
            return self.tok_embed(ids)
        base = self.tok_embed.num_embeddings
        appended = (ids >= base).unsqueeze(-1)
        # both lookups run whatever the batch holds, so both tables always get a (possibly zero) gradient
        return torch.where(appended, self.new_tok_embed((ids - base).clamp(min=0)), self.tok_embed(ids.clamp(max=base - 1)))

    def text_logits(self, hidden: Tensor) -> Tensor:
        """(..., D) hidden states -> (..., vocab_size) next-token logits: the LM head (or, tied, the token
        embedding) over the pretrained vocabulary, then the appended tokens' rows."""
        logits = self.lm_head(hidden) if self.lm_head is not None else F.linear(hidden, self.tok_embed.weight)
        if self.new_tok_embed is not None:
            new = self.new_lm_head(hidden) if self.new_lm_head is not None else F.linear(hidden, self.new_tok_embed.weight)
            logits = torch.cat([logits, new], dim=-1)
        return logits

    def image_logits(self, hidden: Tensor) -> Tensor:
        """(..., D) hidden states -> (..., codebook_size) logits of the next image code (tokens objective)."""
        return self.code_head(hidden)

    def embed(self, inputs: ModelInputs) -> Tensor:
        """(B*L, D) in original order: token embeddings, image positions replaced by embedded patches (diffusion)
        or embedded codes (tokens), plus their 2D grid position."""
        tokens, is_image = inputs.tokens.reshape(-1), inputs.modality.reshape(-1) == self.image_modality
        rows = is_image.nonzero().squeeze(1)
        if self.code_embed is not None:  # image positions hold codebook ids, not text ids
            x = self.embed_tokens(tokens.masked_fill(is_image, 0))
            image_x = self.code_embed(tokens.index_select(0, rows))
        else:
            x = self.embed_tokens(tokens)
            # runs with zero patches too (text-only batches): the image end gets a zero gradient (Routing.apply)
            image_x = self.patch_embed(inputs.patches) + self.time_embed(inputs.timesteps)[inputs.patch_image]
        image_x = image_x + self.config.pos_embed_scale * sincos_2d(inputs.patch_coords, self.config.dim).to(x.dtype)
        return x.index_copy(0, rows, image_x.to(x.dtype))

    def image_modulation(self, inputs: ModelInputs) -> ImageModulation | None:
        """The adaLN conditioning of this forward's image tokens (None without adaLN; with zero image tokens
        it modulates nothing but keeps the modulation weights in the graph)."""
        if self.config.time_conditioning != "adaln":
            return None
        return ImageModulation(self.image_modality, F.silu(self.time_embed(inputs.timesteps)), inputs.patch_image)

    def forward(self, inputs: ModelInputs, check: bool = True, cache: KVCache | None = None,
                extend_cache: bool = True) -> Tensor:
        """Hidden states after the final norm, (B, L, D), zeros at padding positions. Feed text positions to
        `text_logits` and image positions (in row-major order, the order of `inputs.patches`) to
        `image_head`. `cache` and `extend_cache`: see `forward_stream`."""
        x, routing = self.forward_stream(inputs, check, cache, extend_cache)
        return routing.unsort(x).view(*inputs.tokens.shape, -1)

    def forward_stream(self, inputs: ModelInputs, check: bool = True, cache: KVCache | None = None,
                       extend_cache: bool = True) -> tuple[list[Tensor], Routing]:
        """Hidden states after the final norm as the residual stream's parts, (N_m, D) for each part's real
        tokens, and the stream's `Routing` (`by_modality` gives each modality's rows): what the loss needs,
        without the un-sort.

        With `cache`, `inputs` are a chunk of positions that come after the cached ones (their
        `positions` continue each document's) and attend to them too; `extend_cache` appends the chunk's
        keys/values to the cache. Cached chunks always use SDPA (the chunk is short and its length
        changes at every decoding step, which a compiled FlexAttention would recompile for).
        """
        if check:
            inputs.check(self.config)
        batch, seq = inputs.tokens.shape
        device = inputs.tokens.device
        past = 0 if cache is None else len(cache)
        doc_ids, image_ids, kvs = inputs.doc_ids, inputs.image_ids, [None] * len(self.blocks)
        backend = self.attention_backend(device)
        if cache is not None:
            doc_ids, image_ids = cache.ids_with(doc_ids, image_ids, len(self.blocks), self.config.max_seq_len)
            kvs = cache.layers if extend_cache else [TransientKV(kv) for kv in cache.layers]
            backend = "sdpa"
        # one part per modality when anything is untied, and with adaLN (image tokens then form one part)
        routing = Routing(inputs.modality, self.config.num_modalities,
                          sort=bool(self.config.untie) or self.config.time_conditioning == "adaln",
                          padding=inputs.doc_ids < 0)
        mask_mod = transfusion_mask_mod(doc_ids, image_ids, q_offset=past,
                                        bidirectional_images=self.config.image_attention == "bidirectional")
        mask = AttentionMask(mask_mod, batch, seq, past + seq, device, backend)
        rope = rope_tables(inputs.positions, self.config.head_size, self.config.rope_theta, self.config.rope_scaling)
        mod = self.image_modulation(inputs)
        x = routing.sort(self.embed(inputs))  # the stream's parts, (N_m, D) each
        for block, kv in zip(self.blocks, kvs):
            x = block(x, routing, (batch, seq), rope, mask, kv, mod)
        x = routing.apply(self.final_norm, x)
        if mod is not None:
            x = mod.modulate(x, *mod.params(self.final_modulation, 2))
        if cache is not None and extend_cache:
            cache.doc_ids, cache.image_ids = doc_ids, image_ids
        return x, routing

    # -- one save format (diffusers style): model_config.yaml + model.safetensors ------------------

    def save_pretrained(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_yaml_config(self.config, directory / MODEL_CONFIG_FILE)
        weights = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(weights, str(directory / MODEL_WEIGHTS_FILE), metadata={"format": "tmot-model/1"})
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> TransfusionMoT:
        from safetensors.torch import load_file

        directory = Path(directory)
        model = cls(load_yaml_config(ModelConfig, directory / MODEL_CONFIG_FILE))
        model.load_state_dict(load_file(str(directory / MODEL_WEIGHTS_FILE)))
        return model.to(device).eval()


# --------------------------------------------------------------------------------------------------
# which tokens use each parameter, and freezing them (train.freeze, optim.lr_mult)


def expert_twins(model: TransfusionMoT) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """(parameter of another modality's expert, the text expert's same parameter) for every untied group."""
    pairs = []
    for module in model.modules():
        if isinstance(module, Experts) and len(module) > 1:
            text = dict(module[model.text_modality].named_parameters())
            for m, copy in enumerate(module):
                if m != model.text_modality:
                    pairs += [(p, text[name]) for name, p in copy.named_parameters()]
    return pairs


@torch.no_grad()
def copy_text_experts(model: TransfusionMoT) -> None:
    """Every other modality's experts <- the text experts (after loading a pretrained LM). Works on sharded
    parameters too: twins are sharded alike, so each process copies its own shard."""
    for param, text in expert_twins(model):
        local_tensor(param).copy_(local_tensor(text))


def parameter_owners(model: TransfusionMoT) -> dict[str, str]:
    """Which tokens use each parameter (by name): a modality's name, or "shared" (one copy of an expert group
    that is not untied serves every modality). The token embedding and LM head belong to text, the patch and
    timestep embeddings (or the code embedding), the image (or code) head and the adaLN modulations to image."""
    owner_of: dict[int, str] = {}
    for module in model.modules():
        if isinstance(module, Experts):
            for m, copy in enumerate(module):
                for p in copy.parameters():
                    owner_of[id(p)] = model.config.modalities[m] if len(module) > 1 else "shared"
    image_end = [model.patch_embed, model.time_embed, model.image_head, model.code_embed, model.code_head,
                 model.final_modulation, *(blk.modulation for blk in model.blocks)]
    for module in image_end:
        for p in (module.parameters() if module is not None else ()):
            owner_of[id(p)] = "image"
    for module in [model.tok_embed, model.new_tok_embed, model.lm_head, model.new_lm_head]:
        for p in (module.parameters() if module is not None else ()):
            owner_of[id(p)] = "text"
    return {name: owner_of[id(p)] for name, p in model.named_parameters()}


def appended_token_parameters(model: TransfusionMoT) -> set[str]:
    """Names of the rows added to a pretrained LM's vocabulary (BOI, EOI): new to the LM, so they train even
    when the text side is frozen."""
    return {name for name, _ in model.named_parameters() if name.startswith(("new_tok_embed.", "new_lm_head."))}


def parameters_of(model: TransfusionMoT, owners: list[str]) -> list[str]:
    """Names of the parameters `owners` own (`parameter_owners`), but the rows appended to a pretrained
    vocabulary: what `train.freeze: owners` freezes."""
    appended = appended_token_parameters(model)
    return [name for name, owner in parameter_owners(model).items() if owner in owners and name not in appended]


def freeze_parameters(model: TransfusionMoT, owners: list[str]) -> list[str]:
    """requires_grad False on every parameter whose owner (`parameter_owners`) is in `owners`, but
    the rows appended to a pretrained vocabulary (BOI, EOI: new to the LM, they always train). Called on the
    plain model before FSDP2 wraps it (the sharded parameters inherit the flag). Returns the frozen names."""
    params = dict(model.named_parameters())
    frozen = parameters_of(model, owners)
    for name in frozen:
        params[name].requires_grad_(False)
    return frozen
