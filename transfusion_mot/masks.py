"""The Transfusion attention mask, defined once, with two backends.

A query may attend to a key when both are in the same document (packed samples never see each other) and
either the key is not later than the query (causal) or both are patches of the same image (bidirectional
inside an image). Padding keys are never visible; a padding query sees only itself so that no softmax row
is empty (its output is never used).

`transfusion_mask_mod` is the single definition. It is written with broadcasting tensor ops, so the same
function serves as a FlexAttention `mask_mod` (called per (b, h, q, kv) under vmap) and builds the dense
boolean mask for SDPA when called once on broadcast index grids.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from .common.errors import ConfigError

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
# on CPU, bf16 rows with at most this many keys use SDPA's math kernel (see AttentionMask.attend)
CPU_MATH_MAX_KV = 256


def transfusion_mask_mod(doc_ids: Tensor, image_ids: Tensor, q_offset: int = 0,
                         bidirectional_images: bool = True) -> MaskMod:
    """Mask function over (batch, head, query index, key index).

    doc_ids, image_ids: (B, L_kv) long. doc_id -1 marks padding; image_id -1 marks a non-image token.
    q_offset: queries are keys [q_offset, q_offset + L_q) (used when earlier keys come from a KV cache).
    bidirectional_images: False gives the Transfusion paper's ablation (causal attention inside images too).
    """

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        q = q_idx + q_offset
        q_doc = doc_ids[b, q]
        kv_doc = doc_ids[b, kv_idx]
        same_doc = (q_doc == kv_doc) & (kv_doc >= 0)
        visible = kv_idx <= q  # causal
        if bidirectional_images:
            q_img = image_ids[b, q]
            visible = visible | ((q_img >= 0) & (q_img == image_ids[b, kv_idx]))
        return (same_doc & visible) | (q == kv_idx)

    return mask_mod


def dense_mask(mask_mod: MaskMod, batch: int, q_len: int, kv_len: int, device: torch.device) -> Tensor:
    """Materialise `mask_mod` as a (B, 1, Q, KV) bool tensor for SDPA, by broadcasting (no Python loop)."""
    b = torch.arange(batch, device=device).view(batch, 1, 1)
    h = torch.zeros(1, 1, 1, dtype=torch.long, device=device)
    q = torch.arange(q_len, device=device).view(1, q_len, 1)
    kv = torch.arange(kv_len, device=device).view(1, 1, kv_len)
    return mask_mod(b, h, q, kv).unsqueeze(1)


def flex_available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


_compiled: dict[str, Callable] = {}


def _flex_attention() -> Callable:
    """torch.compile'd flex_attention: uncompiled it materialises scores and is slower than SDPA. Dynamic
    shapes, so a new (batch, length) reuses the graph instead of recompiling until dynamo's limit sends it
    to the slow eager path (lengths up to one 128-block and longer ones take one graph each)."""
    if "flex" not in _compiled:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled["flex"] = torch.compile(flex_attention, dynamic=True)
    return _compiled["flex"]


def _block_mask_builder() -> Callable:
    """torch.compile'd create_block_mask: evaluates the mask per block without materialising the dense
    (B, Q, KV) mask, once per forward (every layer shares it)."""
    if "block_mask" not in _compiled:
        from torch.nn.attention.flex_attention import create_block_mask

        _compiled["block_mask"] = torch.compile(create_block_mask, dynamic=True)
    return _compiled["block_mask"]


class AttentionMask:
    """The mask for one batch, built once per forward and shared by every layer.

    backend "sdpa": dense bool mask (any device; the only backend whose backward runs on CPU).
    backend "flex": FlexAttention BlockMask (CUDA); skips fully masked blocks, which pays off with packing.
    """

    def __init__(self, mask_mod: MaskMod, batch: int, q_len: int, kv_len: int, device: torch.device,
                 backend: str) -> None:
        self.backend = backend
        self.mask_mod = mask_mod
        if backend == "sdpa":
            self.dense = dense_mask(mask_mod, batch, q_len, kv_len, device)
        elif backend == "flex":
            self.block_mask = _block_mask_builder()(mask_mod, batch, None, q_len, kv_len, device=device)
        else:
            raise ConfigError(f"unknown attention backend {backend!r}")

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q: (B, H, Q, d), k, v: (B, KV, K, d) with H a multiple of KV (grouped-query attention: query
        head j reads key/value head j // (H / KV)) -> (B, H, Q, d)."""
        gqa = k.shape[1] != q.shape[1]
        if self.backend == "sdpa":
            if q.device.type == "cpu" and q.dtype != torch.float32 and k.shape[2] <= CPU_MATH_MAX_KV:
                # PyTorch's CPU flash kernel is ~3.5x slower than the math kernel on short bf16 rows
                # (benchmarks/attention_cpu.py); on long rows, or in fp32, it is the faster one
                with sdpa_kernel(SDPBackend.MATH):
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=self.dense, enable_gqa=gqa)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.dense, enable_gqa=gqa)
        return _flex_attention()(q, k, v, block_mask=self.block_mask, enable_gqa=gqa)


def resolve_backend(requested: str, device: torch.device) -> str:
    """'auto' picks FlexAttention on CUDA (when present) and SDPA elsewhere."""
    if requested == "auto":
        return "flex" if device.type == "cuda" and flex_available() else "sdpa"
    if requested == "flex":
        if not flex_available():
            raise ConfigError("attn_backend 'flex' needs torch >= 2.5 (torch.nn.attention.flex_attention)")
        if device.type != "cuda":
            raise ConfigError("attn_backend 'flex' needs CUDA: its backward is not implemented on CPU; "
                             "use attn_backend: sdpa or auto")
    return requested
