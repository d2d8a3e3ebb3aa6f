"""An offline English text corpus for text-only training documents: the docstrings of Python's standard
library, one sentence-sized document per line (`data.text_only_path`).

Why: the MoT paper's gains come from a mixed-modal load, where text and images compete for the same
weights. Captions alone are a tiny language load; mixing in real prose (here: documentation English) is
the closest a machine without internet gets to the paper's text corpus. Deterministic for a given Python.

    python benchmarks/text_corpus.py --out tmot_data/stdlib-docs.txt [--max-chars 160]
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
import re
import sys
import warnings
from pathlib import Path

# modules whose import has side effects (GUIs, test runners, interactive helpers) are not read
SKIP = ("test", "idlelib", "tkinter", "turtle", "turtledemo", "antigravity", "this", "lib2to3", "ensurepip",
        "pydoc_data", "venv", "__main__", "xxlimited", "_")


def _documented(module) -> list:
    """The module, its classes and functions, and the classes' methods."""
    objects = [module]
    for _, value in sorted(vars(module).items()):
        if inspect.isclass(value) or inspect.isfunction(value):
            objects.append(value)
            if inspect.isclass(value):
                objects += [v for _, v in sorted(vars(value).items()) if inspect.isfunction(v)]
    return objects


def stdlib_modules() -> list[str]:
    names = sorted(m.name for m in pkgutil.iter_modules() if m.name in sys.stdlib_module_names
                   and not m.name.startswith(SKIP))
    out = []
    for name in names:
        out.append(name)
        try:
            module = importlib.import_module(name)
        except Exception:  # platform-specific modules
            continue
        if hasattr(module, "__path__"):  # a package: its submodules too
            out += sorted(m.name for m in pkgutil.walk_packages(module.__path__, name + ".", onerror=lambda _: None)
                          if not any(part.startswith(SKIP) for part in m.name.split(".")[1:]))
    return out


def stdlib_docstrings() -> list[str]:
    docs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in stdlib_modules():
            try:
                module = importlib.import_module(name)
            except Exception:  # platform-specific modules
                continue
            docs += [doc for obj in _documented(module) if (doc := inspect.getdoc(obj))]
    return list(dict.fromkeys(docs))  # first occurrence of each


def sentences(text: str, max_chars: int) -> list[str]:
    """Prose sentences of a docstring (code examples and tables dropped), at most max_chars each."""
    out = []
    for paragraph in re.split(r"\n\s*\n", text):
        if ">>>" in paragraph or paragraph.lstrip().startswith(("-", "*", "|", "+", "=")):
            continue
        flat = " ".join(paragraph.split())
        for sentence in re.split(r"(?<=[.!?])\s+", flat):
            if 20 <= len(sentence) <= max_chars and sentence[0].isupper() and sentence.isascii():
                out.append(sentence)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="tmot_data/stdlib-docs.txt")
    ap.add_argument("--max-chars", type=int, default=160)
    args = ap.parse_args()
    lines = list(dict.fromkeys(s for doc in stdlib_docstrings() for s in sentences(doc, args.max_chars)))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(line + "\n" for line in lines))
    print(f"{len(lines):,} documents, {sum(map(len, lines)):,} characters -> {out}")


if __name__ == "__main__":
    main()
