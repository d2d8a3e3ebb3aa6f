"""The EMA update under FSDP2: one fused foreach over each process's local shards (what `EMA.update` does)
against the same foreach over the DTensor parameters (DTensor dispatches it tensor by tensor in Python).

The model has the 760m config's depth and tensor count (24 MoT layers: 396 parameter tensors) at a small
width, so what is timed is the per-tensor overhead, which is what the model's size does not change. One
process in a gloo group (world size 1: the DTensor path is the same on any number of processes). Timed
interleaved, median of the repeats; the last line is one JSON object.

    python benchmarks/ema_fsdp.py [--repeats 50 --dim 64]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from transfusion_mot.common.config import from_dict, read_yaml_mapping
from transfusion_mot.config import ModelConfig
from transfusion_mot.model import TransfusionMoT
from transfusion_mot.training.optim import EMA

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--dim", type=int, default=64)
    args = ap.parse_args()
    raw = read_yaml_mapping(REPO / "configs/model/760m.yaml")
    raw.update(dim=args.dim, n_heads=4, ffn_dim=2 * args.dim, vocab_size=512)
    config = from_dict(ModelConfig, raw)
    from torch.distributed.fsdp import fully_shard

    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", store=dist.FileStore(str(Path(tmp) / "store"), 1), rank=0, world_size=1)
        try:
            torch.manual_seed(0)
            model = TransfusionMoT(config)
            for block in model.blocks:
                fully_shard(block)
            fully_shard(model)
            ema = EMA(model, 0.999)
            names = list(ema.shadow)
            params = dict(model.named_parameters())

            def local() -> None:
                ema.update(model)

            def dtensor() -> None:
                with torch.no_grad():
                    torch._foreach_lerp_([ema.shadow[n] for n in names], [params[n].detach() for n in names], 0.001)

            times: dict[str, list[float]] = {"local": [], "dtensor": []}
            for fn in (local, dtensor):
                fn()  # warm-up
            for _ in range(args.repeats):
                for key, fn in (("local", local), ("dtensor", dtensor)):
                    start = time.perf_counter()
                    fn()
                    times[key].append(time.perf_counter() - start)
        finally:
            dist.destroy_process_group()
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"EMA update, {len(names)} tensors: local shards {med['local'] * 1e3:.2f} ms, DTensors "
          f"{med['dtensor'] * 1e3:.2f} ms ({med['dtensor'] / med['local']:.1f}x)")
    print(json.dumps({"benchmark": "ema_fsdp", "tensors": len(names), "dim": args.dim, "layers": config.n_layers,
                      "local_ms": round(med["local"] * 1e3, 3), "dtensor_ms": round(med["dtensor"] * 1e3, 3),
                      "dtensor_over_local": round(med["dtensor"] / med["local"], 2), "repeats": args.repeats,
                      "torch": torch.__version__, "machine": platform.processor() or platform.machine()}))


if __name__ == "__main__":
    main()
