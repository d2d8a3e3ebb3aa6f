"""`tmot`: a thin command-line layer over the library. Each command maps to one library function."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import ConfigError


class UserError(Exception):
    """A mistake in the command line or its inputs: reported in one line, exit status 2."""


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_core_demo

    report = run_core_demo(args.out, steps=args.steps, seed=args.seed)
    out = Path(args.out)
    print((out / "report.md").read_text())
    print(f"report: {out / 'report.md'}  json: {out / 'report.json'}  per-step losses: {out / 'metrics.jsonl'}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from .accounting import parameter_accounting
    from .config import load_yaml_config, ModelConfig
    from .model import TransfusionMoT

    cfg = load_yaml_config(ModelConfig, args.config, args.set)
    with torch.device("meta"):  # no memory for the weights: the 7B config is accounted in milliseconds
        model = TransfusionMoT(cfg)
    print(json.dumps(parameter_accounting(model, seq_len=args.seq_len), indent=None if args.json else 2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tmot", description="Transfusion text-to-image models on a Mixture-of-Transformers backbone.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  tmot demo --out tmot_demo\n  tmot info --config configs/model/760m.yaml")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="train a tiny MoT and its dense baseline side by side on embedded data",
                       description="Train a tiny MoT and its dense baseline (same code, nothing untied) on "
                                   "embedded synthetic image-caption data and report both losses.",
                       epilog="example: tmot demo --out tmot_demo --steps 400")
    p.add_argument("--out", default="tmot_demo", help="output directory (default: tmot_demo)")
    p.add_argument("--steps", type=int, default=400, help="training steps per model (default: 400)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("info", help="parameter and FLOP accounting of a model config",
                       description="Total, per-modality and active parameters per token, and training FLOPs "
                                   "per token (6N + attention), without allocating the weights.",
                       epilog="example: tmot info --config configs/model/760m.yaml --set untie=[]")
    p.add_argument("--config", required=True, help="model config YAML (configs/model/*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--seq-len", type=int, default=None, help="context for the attention FLOPs (default: max_seq_len)")
    p.add_argument("--json", action="store_true", help="one-line JSON")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "steps", 1) is not None and getattr(args, "steps", 1) <= 0:
        parser.error("--steps must be positive")
    try:
        return args.func(args)
    except (UserError, ConfigError, ValueError, FileNotFoundError) as err:
        print(f"tmot {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tmot {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
