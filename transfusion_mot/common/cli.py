"""Command-line helpers shared by `tmot` and `python -m eval`: an argparse parser whose mistakes are one
line, value types that say what they expected, and the entry point that prints a `UserError` as one line
(exit status 2) while letting every other exception keep its traceback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from .errors import UserError

# `--compile` of the sampling commands (tmot sample, tmot eval bench, tmot eval geneval-export), as measured on
# 2 CPU cores (BENCHMARKS.md, "The denoising step, compiled"); not measured on a GPU
COMPILE_HELP = ("compile the model's blocks first (torch.compile): on 2 CPU cores 3-23 s once, then ~0.8x the time "
                "per batch; pays from a few hundred to a few thousand images")


class Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (plus the --help hint), not a usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(text: str, minimum: int, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0, "an integer >= 0")


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {value}")
    return value


def bounded_float(low: float, high: float) -> Callable[[str], float]:
    """An argparse type: a finite number in [low, high] (nan, inf and absurd values are refused by name)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number in [{low:g}, {high:g}], got {text!r}") from None
        if not low <= value <= high:  # also false for nan
            raise argparse.ArgumentTypeError(f"expected a number in [{low:g}, {high:g}], got {text}")
        return value

    return parse


def run_command(name: str, func: Callable[[], int]) -> int:
    """Run a command: a UserError is one line on stderr and exit status 2, Ctrl-C exit status 130; any other
    exception propagates with its traceback (it is a bug, and hiding it would hide the defect)."""
    try:
        return func()
    except UserError as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130


__all__ = ["Parser", "bounded_float", "fraction", "non_negative_int", "positive_int", "run_command"]
