"""Starting from a pretrained language model (LMFusion, arXiv 2412.15188) and giving it back.

A Hugging Face causal LM of a supported architecture (`SUPPORTED`) is the text side of the MoT: its config
gives the backbone's shape (`lm_model_keys`), its weights become the text experts, the token embedding, the
final norm and the LM head (`load_lm_weights`; the other modalities' experts then start as copies of the
text experts, or fresh), and its tokenizer stays the run's tokenizer with BOI and EOI appended as new rows.
`export_text_lm` writes the text side back as a model of the architecture it came from, loadable with
`AutoModelForCausalLM.from_pretrained`.

The text side then computes exactly what the LM computes: pre-norm blocks, RMSNorm, SwiGLU, grouped-query
attention with RoPE (Llama-3's frequency rule where the config has it), Q/K/V biases (Qwen2), per-head
Q/K RMSNorm before RoPE (Qwen3), tied or untied embeddings. What differs from the LM is kept out of the
text positions: image tokens have their own experts, and text only sees text under the causal mask.

Weights are read tensor by tensor from the LM's safetensors files (one file or a sharded index), so no
process holds a second copy of the model; a sharded (FSDP2) parameter keeps only its own shard.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .common.errors import ConfigError, InputNotFound, InvalidInput
from .common.hub import local_snapshot
from .common.tensors import copy_full_into
from .config import ModelConfig, lm_model_keys, read_lm_config
from .model import copy_text_experts

WEIGHT_FILES = ["*.safetensors", "*.safetensors.index.json", "config.json"]


# --------------------------------------------------------------------------------------------------
# the LM's config against the model config


def check_matches_lm(config: ModelConfig) -> None:
    """ConfigError when a model config with init_from differs from its LM (a config built by hand, not by
    `run_config_from_dict`, which fills the LM's keys)."""
    derived = lm_model_keys(read_lm_config(config.init_from), config.init_from, config.max_seq_len)
    wrong = [k for k, v in derived.items() if getattr(config, k) != v]
    if wrong:
        k = wrong[0]
        raise ConfigError(f"model.{k} is {getattr(config, k)!r} but {config.init_from} has {derived[k]!r}; build the "
                          "config with transfusion_mot.config.run_config_from_dict, which takes every shape key from the LM")


def keep_lm_files(source: str | Path, tokenizer: Any, directory: str | Path, write: bool = True) -> None:
    """Check that `tokenizer` is the LM's (its BOS/EOS ids are the ones the LM's config names: not a tokenizer
    of another model that happens to fit its vocabulary; InvalidInput otherwise) and, with `write`, keep the
    LM's config.json and the tokenizer's files (no weights) in `directory`, so that sampling, export and
    `export_text_lm` of a run need neither the Hub nor the original directory."""
    lm = read_lm_config(source)
    for name in ("bos", "eos"):
        want = getattr(lm, f"{name}_token_id", None)
        have = getattr(tokenizer.tok, f"{name}_token_id", None)
        allowed = set(want) if isinstance(want, (list, tuple)) else {want}
        if want is not None and have is not None and have not in allowed:
            raise InvalidInput(f"tokenizer {tokenizer.source} does not match {source}: its {name.upper()} id is {have}, "
                               f"the model's config says {want}")
    if write:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        lm.save_pretrained(str(directory))
        tokenizer.save_pretrained(directory)


# --------------------------------------------------------------------------------------------------
# weights: our names <-> the LM's


def weight_map(config: ModelConfig) -> dict[str, list[str]]:
    """Each text-side parameter of ours -> the LM tensors it is made of (concatenated along dim 0): the
    fused Q/K/V and gate/up projections take three and two. Experts of a group that is not untied are
    the one shared copy (a dense model started from the LM)."""
    text = config.modalities.index("text")

    def expert(group: str) -> int:
        return text if config.untied(group) else 0

    a, f, n = expert("attn"), expert("ffn"), expert("norm")
    names: dict[str, list[str]] = {"tok_embed.weight": ["model.embed_tokens.weight"],
                                   f"final_norm.{n}.weight": ["model.norm.weight"]}
    if not config.tie_embeddings:
        names["lm_head.weight"] = ["lm_head.weight"]
    for i in range(config.n_layers):
        ours, lm = f"blocks.{i}.", f"model.layers.{i}."
        attn = lm + "self_attn."
        names[f"{ours}attn.qkv.{a}.weight"] = [f"{attn}{p}_proj.weight" for p in "qkv"]
        if config.qkv_bias:
            names[f"{ours}attn.qkv.{a}.bias"] = [f"{attn}{p}_proj.bias" for p in "qkv"]
        names[f"{ours}attn.out.{a}.weight"] = [f"{attn}o_proj.weight"]
        if config.out_bias:
            names[f"{ours}attn.out.{a}.bias"] = [f"{attn}o_proj.bias"]
        if config.qk_norm:
            names[f"{ours}attn.q_norm.{n}.weight"] = [f"{attn}q_norm.weight"]
            names[f"{ours}attn.k_norm.{n}.weight"] = [f"{attn}k_norm.weight"]
        names[f"{ours}attn_norm.{n}.weight"] = [f"{lm}input_layernorm.weight"]
        names[f"{ours}ffn_norm.{n}.weight"] = [f"{lm}post_attention_layernorm.weight"]
        names[f"{ours}ffn.{f}.gate_up.weight"] = [f"{lm}mlp.gate_proj.weight", f"{lm}mlp.up_proj.weight"]
        names[f"{ours}ffn.{f}.down.weight"] = [f"{lm}mlp.down_proj.weight"]
    return names


class LMWeights:
    """The tensors of an LM's safetensors files, read one at a time (`model.safetensors` or a sharded
    `model.safetensors.index.json`)."""

    def __init__(self, source: str | Path) -> None:
        directory = Path(local_snapshot(source, "of a transformers causal LM", allow_patterns=WEIGHT_FILES))
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            files = json.loads(index.read_text())["weight_map"]
            self.files = {name: directory / file for name, file in files.items()}
        elif (directory / "model.safetensors").is_file():
            from safetensors import safe_open

            single = directory / "model.safetensors"
            with safe_open(str(single), framework="pt") as f:
                self.files = {name: single for name in f.keys()}
        else:
            raise InputNotFound(f"model.init_from {source}: no model.safetensors or model.safetensors.index.json "
                                "(save the LM with save_pretrained, which writes safetensors)")
        self.source = source

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self.files:
            raise InvalidInput(f"model.init_from {self.source}: the weights lack {name} (a checkpoint of another "
                               "architecture than its config says?)")
        with safe_open(str(self.files[name]), framework="pt") as f:
            return f.get_tensor(name).float()


@torch.no_grad()
def load_lm_weights(model: torch.nn.Module, source: str | Path) -> dict[str, Any]:
    """The LM's weights into the text side of `model` (possibly sharded: each process keeps its shard); the
    appended token rows start at the mean of the LM's rows (as transformers' resize_token_embeddings does),
    and with `copy_experts` every other modality's experts become copies of the text experts. Returns what
    was loaded, for the run's summary."""
    config = model.config
    weights = LMWeights(source)
    params = dict(model.named_parameters())
    for ours, theirs in weight_map(config).items():
        full = torch.cat([weights.get(name) for name in theirs], dim=0)
        if tuple(full.shape) != tuple(params[ours].shape):
            raise InvalidInput(f"model.init_from {source}: {theirs[0]} has shape {tuple(full.shape)}, the config makes "
                               f"it {tuple(params[ours].shape)}")
        copy_full_into(params[ours], full)
    if model.new_tok_embed is not None:
        embed = weights.get("model.embed_tokens.weight")
        copy_full_into(model.new_tok_embed.weight, embed.mean(0, keepdim=True).expand_as(model.new_tok_embed.weight))
        if model.new_lm_head is not None:
            head = weights.get("lm_head.weight")
            copy_full_into(model.new_lm_head.weight, head.mean(0, keepdim=True).expand_as(model.new_lm_head.weight))
    if config.copy_experts:
        copy_text_experts(model)
    return {"init_from": str(source), "tensors": sum(len(t) for t in weight_map(config).values()),
            "experts": "copies of the text experts" if config.copy_experts else "random"}


def text_lm_state_dict(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """The LM's tensors (its names, its vocabulary: the appended rows dropped) from a full state dict of
    ours: the inverse of `load_lm_weights` for the text side."""
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in weight_map(config).items():
        value = state[ours]
        if len(theirs) == 1:
            out[theirs[0]] = value
            continue
        if ".attn.qkv." in ours:
            sizes = [config.n_heads * config.head_size] + [config.kv_heads * config.head_size] * 2
        else:  # gate and up
            sizes = [config.ffn_dim, config.ffn_dim]
        out.update(zip(theirs, value.split(sizes, dim=0)))
    if config.tie_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


# --------------------------------------------------------------------------------------------------
# the LM's files in a run directory, and the way back


def export_text_lm(state: dict[str, torch.Tensor], config: ModelConfig, lm_files: str | Path,
                   out: str | Path) -> Path:
    """The text side as a transformers model of the LM's architecture (`lm_files`: the config.json and
    tokenizer a run kept with `keep_lm_files`), in the LM's dtype, written with save_pretrained."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    lm_files = Path(lm_files)
    lm_config = AutoConfig.from_pretrained(str(lm_files))
    lm = AutoModelForCausalLM.from_config(lm_config).float()
    missing, unexpected = lm.load_state_dict(text_lm_state_dict(state, config), strict=False)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:  # an internal mismatch between weight_map and the architecture
        raise AssertionError(f"text LM export: missing {missing[:3]}, unexpected {unexpected[:3]}")
    dtype = getattr(lm_config, "dtype", None) or getattr(lm_config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if isinstance(dtype, torch.dtype):
        lm = lm.to(dtype)
    out = Path(out)
    lm.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(lm_files)).save_pretrained(str(out))
    return out


__all__ = ["LMWeights", "check_matches_lm", "export_text_lm", "keep_lm_files", "load_lm_weights", "text_lm_state_dict",
           "weight_map"]
