"""JSON and JSONL files: one reader that names the file and line of a bad record, and writers that replace
a file atomically (a temporary file renamed into place), so a crash never leaves half a file behind. And
content checks: the sizes and sha256 of a directory's files, recorded when it is written (checkpoints,
exported pipelines, latent caches) and verified when it is read, so a file cut short or changed since is
named instead of failing somewhere inside a reader."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import InputNotFound, InvalidInput


def iter_jsonl(path: str | os.PathLike, what: str = "file") -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line of a JSONL file; a missing file, invalid JSON or a line
    that is not an object is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFound(f"{what} not found: {path}")
    with open(path, encoding="utf-8-sig", errors="strict") as f:  # a byte-order mark is not data
        for lineno, line in _lines(f, path):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise InvalidInput(f"{path}:{lineno}: invalid JSON: {err}") from None
            if not isinstance(row, dict):
                raise InvalidInput(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def _lines(f, path: Path) -> Iterator[tuple[int, str]]:
    lineno = 0
    try:
        for lineno, line in enumerate(f, 1):
            yield lineno, line
    except UnicodeDecodeError as err:
        raise InvalidInput(f"{path}:{lineno + 1}: not UTF-8 text ({err.reason}); save it as UTF-8") from None


def read_jsonl(path: str | os.PathLike, what: str = "file") -> list[dict[str, Any]]:
    """Every object of a JSONL file, in order (see `iter_jsonl`)."""
    return [row for _, row in iter_jsonl(path, what)]


def read_texts(path: str | os.PathLike, fields: tuple[str, ...], what: str = "file") -> list[str]:
    """One text per record: a .jsonl file's objects (the first of `fields` that a line has, a string), or any
    other file's non-blank lines (stripped)."""
    path = Path(path)
    if path.suffix != ".jsonl":
        if not path.is_file():
            raise InputNotFound(f"{what} not found: {path}")
        try:
            text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not part of the first line
        except UnicodeDecodeError as err:
            raise InvalidInput(f"{path}: not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8") from None
        return [line.strip() for line in text.splitlines() if line.strip()]
    texts = []
    for lineno, row in iter_jsonl(path, what):
        text = next((row[f] for f in fields if f in row), None)
        if not isinstance(text, str):
            raise InvalidInput(f"{path}:{lineno}: expected a JSON object with a string "
                               + " or ".join(f'"{f}"' for f in fields))
        texts.append(text)
    return texts


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts: a .jsonl file with "prompt" (or "text") per line, or a text file with one per line."""
    return [p.strip() for p in read_texts(path, ("prompt", "text"), "prompt file")]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Indented JSON, replaced atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode("utf-8"))


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> None:
    """One JSON object per line, replaced atomically."""
    text = "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows)
    atomic_write_bytes(path, text.encode("utf-8"))


__all__ = ["atomic_write_bytes", "iter_jsonl", "read_jsonl", "read_prompts", "read_texts", "write_json", "write_jsonl"]


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_manifest(root: str | os.PathLike, exclude: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
    """{relative path: {"size", "sha256"}} of every file below `root` (posix paths, sorted)."""
    root, skip = Path(root), set(exclude)
    return {rel: {"size": p.stat().st_size, "sha256": file_sha256(p)}
            for p in sorted(root.rglob("*")) if p.is_file() and (rel := p.relative_to(root).as_posix()) not in skip}


def manifest_problem(root: str | os.PathLike, manifest: dict[str, dict[str, Any]], hashes: bool = True) -> str | None:
    """What is wrong with `root` against its manifest ("FILE is missing", "FILE has N bytes, M were
    written", "FILE changed since it was written"), or None when every file is as written."""
    root = Path(root)
    for rel, want in manifest.items():
        path = root / rel
        if not path.is_file():
            return f"{rel} is missing"
        size = path.stat().st_size
        if size != int(want["size"]):
            return f"{rel} has {size} bytes but {want['size']} were written (a full disk or a copy cut short?)"
    if hashes:
        for rel, want in manifest.items():
            if file_sha256(root / rel) != want["sha256"]:
                return f"{rel} changed since it was written (sha256 mismatch)"
    return None
