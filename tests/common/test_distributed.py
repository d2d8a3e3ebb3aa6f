"""Collectives of a process group: they run on the group's device (NCCL serves only CUDA tensors), and a
single process needs none."""

import pytest
import torch

from transfusion_mot.common import distributed
from transfusion_mot.common.distributed import DistInfo, all_reduce_sum, any_rank, barrier, init_distributed


class Recorded(Exception):
    pass


def test_collectives_run_on_the_process_group_device(monkeypatch):
    """NCCL serves only CUDA tensors: every collective must put its tensor on DistInfo.device (here the meta
    device stands in for a GPU, which a CPU cannot show otherwise), whatever device the values live on."""
    devices = []

    def fake_all_reduce(tensor, op=None):
        devices.append(tensor.device)
        raise Recorded

    monkeypatch.setattr(distributed.dist, "all_reduce", fake_all_reduce)
    info = DistInfo(rank=0, world_size=2, device=torch.device("meta"))
    for call in (lambda: all_reduce_sum(torch.zeros(9, dtype=torch.float64), info), lambda: any_rank(True, info)):
        with pytest.raises(Recorded):
            call()
    assert devices == [torch.device("meta")] * 2
    barriers = []
    monkeypatch.setattr(distributed.dist, "barrier", lambda **kw: barriers.append(kw))
    barrier(DistInfo(rank=1, world_size=2, device=torch.device("cuda", 1)))
    barrier(DistInfo(rank=1, world_size=2))
    assert barriers == [{"device_ids": [1]}, {}]
    # a single process needs no collective at all
    assert all_reduce_sum(torch.ones(2), DistInfo()).tolist() == [1.0, 1.0]


def test_a_process_outside_torchrun_is_a_world_of_one(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main, info.distributed) == (0, 1, True, False)
