"""SDPA on the CPU: PyTorch's default (flash) kernel versus the math kernel, forward + backward, fp32 and
bf16 autocast, with the boolean masks our models use. Measured side by side in one process.

Why: `transfusion_mot.masks.AttentionMask` picks the math kernel for short bf16 rows on the CPU
(`CPU_MATH_MAX_KV`), where the flash kernel is several times slower; this script is the measurement behind
that rule. The last line is one JSON object.

    python benchmarks/attention_cpu.py [--threads 1 --repeats 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# (batch, heads, sequence, head dim): the tiny config at batch 32 with 16 or 64 image tokens, then longer rows
SHAPES = [(32, 4, 60, 32), (32, 4, 110, 32), (8, 4, 300, 64), (2, 8, 1000, 64)]


def time_fwd_bwd(fn, repeats: int) -> float:
    for _ in range(2):
        fn().sum().backward()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn().sum().backward()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    print("| batch, heads, seq, head dim | precision | default (flash) ms | math ms | flash / math |")
    print("|---|---|---|---|---|")
    for b, h, length, d in SHAPES:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(b, h, length, d, generator=g, requires_grad=True) for _ in range(3))
        mask = torch.ones(b, 1, length, length, dtype=torch.bool).tril()
        for precision in ("fp32", "bf16"):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                flash = time_fwd_bwd(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), args.repeats)
                with sdpa_kernel(SDPBackend.MATH):
                    math_ms = time_fwd_bwd(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                                           args.repeats)
            rows.append({"shape": [b, h, length, d], "precision": precision, "flash_ms": round(flash, 2),
                         "math_ms": round(math_ms, 2), "flash_over_math": round(flash / math_ms, 2)})
            print(f"| {b}, {h}, {length}, {d} | {precision} | {flash:.1f} | {math_ms:.1f} | {flash / math_ms:.2f} |")
    print(json.dumps({"threads": args.threads, "torch": torch.__version__, "rows": rows}))


if __name__ == "__main__":
    main()
