"""A real English text corpus, offline: the glosses of WordNet (Debian's `wordnet-base`, ~117k definitions
such as "a round object that is hit or thrown or kicked in games"), as train/val documents, one per line.

They serve as text-only training documents (`data.text_only_path`), as held-out documents for the corpus loss
(`data.text_val_path`), and as the pretraining text of a small language model (benchmarks/lmfusion.py). The
split is by a hash of each document's text, so it does not depend on the order of the files or the platform;
duplicates are dropped (a gloss shared by two synsets is one document).
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

from ..common.errors import InputNotFound, InvalidInput
from ..common.files import atomic_write_bytes, file_sha256, write_json

WORDNET_DIR = "/usr/share/wordnet"
WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")


def wordnet_glosses(directory: str | Path = WORDNET_DIR) -> list[str]:
    """Every distinct gloss (the text after " | " of each synset line; the licence header lines start with
    spaces), in file order, whitespace normalised."""
    directory = Path(directory)
    missing = [name for name in WORDNET_FILES if not (directory / name).is_file()]
    if missing:
        raise InputNotFound(f"WordNet not found in {directory} (no {missing[0]}): on Debian/Ubuntu `apt-get install "
                            "wordnet-base`, or pass --wordnet-dir DIR holding data.noun, data.verb, data.adj, data.adv")
    seen: dict[str, None] = {}
    for name in WORDNET_FILES:
        for line in (directory / name).read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith(" ") or " | " not in line:
                continue
            gloss = " ".join(line.split(" | ", 1)[1].split())
            if gloss:
                seen.setdefault(gloss, None)
    if not seen:
        raise InvalidInput(f"{directory}: no glosses in the WordNet data files")
    return list(seen)


def in_validation(text: str, val_fraction: float) -> bool:
    """The document's split, by a hash of its text: stable whatever order the documents come in."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64 < val_fraction


def build_corpus(out: str | Path, val_fraction: float = 0.02, seed: int = 0,
                 wordnet_dir: str | Path = WORDNET_DIR) -> dict[str, Any]:
    """OUT/train.txt and OUT/val.txt (one document per line; train shuffled with `seed`, val in file order)
    and OUT/info.json (source, counts, sizes, sha256 of both files). Returns the info."""
    if not 0 < val_fraction < 1:
        raise InvalidInput(f"val_fraction must be in (0, 1), got {val_fraction}")
    docs = wordnet_glosses(wordnet_dir)
    train = [d for d in docs if not in_validation(d, val_fraction)]
    val = [d for d in docs if in_validation(d, val_fraction)]
    if not train or not val:
        raise InvalidInput(f"{len(docs)} documents give an empty split at val_fraction {val_fraction}")
    random.Random(seed).shuffle(train)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, split in (("train.txt", train), ("val.txt", val)):
        atomic_write_bytes(out / name, ("\n".join(split) + "\n").encode("utf-8"))
        files[name] = {"documents": len(split), "characters": sum(map(len, split)),
                       "sha256": file_sha256(out / name)}
    info = {"source": f"WordNet glosses ({Path(wordnet_dir) / 'data.{noun,verb,adj,adv}'}, Debian wordnet-base)",
            "documents": len(docs), "val_fraction": val_fraction, "seed": seed, "files": files}
    write_json(out / "info.json", info)
    return info


__all__ = ["WORDNET_DIR", "build_corpus", "in_validation", "wordnet_glosses"]
