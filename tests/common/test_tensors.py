"""Copying full tensors into sharded parameters: each process keeps exactly its own shard, with no
communication (what meta-device initialisation and loading full checkpoints rely on)."""

import torch

from transfusion_mot.common.tensors import copy_full_into, local_tensor


def test_plain_tensors_are_copied_whole():
    target = torch.zeros(3, 2, dtype=torch.bfloat16)
    full = torch.randn(3, 2)
    copy_full_into(target, full)
    assert torch.equal(target, full.to(torch.bfloat16))
    assert local_tensor(target) is target


RANK_1_OF_2 = """
import torch
from torch import nn
from torch.distributed.fsdp import fully_shard
from helpers import process_group
from transfusion_mot.common.tensors import copy_full_into, local_tensor

full = torch.arange(5 * 3, dtype=torch.float32).reshape(5, 3)
with process_group(1, 2):
    layer = nn.Linear(3, 5, bias=False)
    fully_shard(layer)
    copy_full_into(layer.weight, full)
    assert tuple(layer.weight.shape) == (5, 3)
    assert torch.equal(local_tensor(layer.weight), full[3:]), local_tensor(layer.weight)  # chunk(2): 3 + 2 rows
print("ok")
"""


def test_each_rank_keeps_its_own_rows_of_an_fsdp2_parameter():
    """Rank 1 of 2 (torch's fake process group; its own process, as device meshes cache the rank)."""
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.run([sys.executable, "-c", RANK_1_OF_2], cwd=Path(__file__).parents[1], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
