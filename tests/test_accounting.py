"""Parameter and FLOP accounting."""

import dataclasses

from helpers import tiny_config

from transfusion_mot.accounting import parameter_accounting
from transfusion_mot.model import TransfusionMoT


def test_accounting_mot_versus_dense():
    cfg = tiny_config(untie=["attn", "ffn", "norm"])
    mot = parameter_accounting(TransfusionMoT(cfg), seq_len=100)
    dense = parameter_accounting(TransfusionMoT(dataclasses.replace(cfg, untie=[])), seq_len=100)
    D, V = cfg.dim, cfg.vocab_size
    # every parameter is counted once
    assert mot["total_params"] == mot["shared_params"] + sum(mot["params_per_modality"].values())
    assert dense["total_params"] == dense["shared_params"] + sum(dense["params_per_modality"].values())
    # a token's active parameters are the same in MoT and dense: FLOPs per token are equal
    assert mot["active_params_per_token"] == dense["active_params_per_token"]
    assert mot["train_flops_per_token"] == dense["train_flops_per_token"]
    # text: backbone + LM head (embedding lookup excluded); image: backbone + patch in/out
    backbone = dense["shared_params"]
    assert dense["active_params_per_token"]["text"] == backbone + D * V
    pd = cfg.patch_dim
    assert dense["active_params_per_token"]["image"] == backbone + (pd * D + D) + (D * pd + pd)
    assert mot["train_flops_per_token"]["text"] == 6 * (backbone + D * V) + 12 * cfg.n_layers * D * 100
    assert mot["shared_params"] == 0
