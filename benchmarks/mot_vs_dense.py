"""MoT versus its dense baseline (same code, nothing untied), trained side by side on embedded synthetic
latents: held-out text and image losses and tokens/s of each. Writes OUT/report.md, report.json, metrics.jsonl.

    python benchmarks/mot_vs_dense.py [--out mot_vs_dense --steps 400 --seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transfusion_mot.core_demo import run_core_demo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="mot_vs_dense")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    run_core_demo(args.out, steps=args.steps, seed=args.seed)
    print((Path(args.out) / "report.md").read_text())


if __name__ == "__main__":
    main()
