"""Parameter and FLOP accounting."""

import dataclasses

import torch
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


def test_batch_flops_count_each_token_against_its_own_document():
    """6 x active parameters per real token of each modality, plus 12 x layers x dim per (query, key) pair
    inside each document: a naive double loop over positions gives the same number."""
    from transfusion_mot.accounting import batch_train_flops

    model = TransfusionMoT(tiny_config())
    acc = parameter_accounting(model)
    cfg = model.config
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, -1], [0, 0, 0, 0, 0, 0]])
    modality = torch.tensor([[0, 1, 0, 0, 1, 0], [0, 0, 1, 1, 1, 0]])
    naive = 0.0
    for r in range(2):
        for q in range(6):
            if doc_ids[r, q] < 0:
                continue
            naive += 6 * acc["active_params_per_token"][cfg.modalities[int(modality[r, q])]]
            naive += 12 * cfg.n_layers * cfg.dim * int((doc_ids[r] == doc_ids[r, q]).sum())
    assert batch_train_flops(acc, modality, doc_ids, cfg.modalities) == naive
