"""JSON/JSONL files: the reader names the file and line of a bad record; prompts from .txt or .jsonl; writers
replace a file atomically."""

import json

import pytest

from transfusion_mot.common.errors import InputNotFound, InvalidInput
from transfusion_mot.common.files import (
    atomic_write_bytes,
    iter_jsonl,
    read_jsonl,
    read_prompts,
    write_json,
    write_jsonl,
)


def test_read_jsonl_skips_blank_lines_and_names_bad_ones(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n\n  \n{"a": 2}\n')  # a byte-order mark is not data
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]
    assert [n for n, _ in iter_jsonl(path)] == [1, 4]
    path.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(InvalidInput, match=r"a.jsonl:2: invalid JSON"):
        read_jsonl(path)
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(InvalidInput, match=r"a.jsonl:2: expected a JSON object, got list"):
        read_jsonl(path)
    with pytest.raises(InputNotFound, match="captions file not found"):
        read_jsonl(tmp_path / "none.jsonl", "captions file")


def test_read_prompts(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text(" a red circle \n\nblue square\n")
    assert read_prompts(txt) == ["a red circle", "blue square"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "x"}\n{"text": "y"}\n')
    assert read_prompts(jsonl) == ["x", "y"]
    jsonl.write_text('{"caption": "x"}\n')
    with pytest.raises(InvalidInput, match=r'p.jsonl:1: expected a JSON object with a string "prompt" or "text"'):
        read_prompts(jsonl)
    with pytest.raises(InputNotFound, match="prompt file not found"):
        read_prompts(tmp_path / "missing.txt")


def test_writers_replace_atomically(tmp_path):
    path = tmp_path / "x.json"
    write_json(path, {"b": 1, "p": tmp_path})
    assert json.loads(path.read_text()) == {"b": 1, "p": str(tmp_path)}
    write_jsonl(tmp_path / "r.jsonl", [{"t": "ä"}, {"t": 2}])
    assert read_jsonl(tmp_path / "r.jsonl") == [{"t": "ä"}, {"t": 2}]

    class Boom:
        def __len__(self):
            raise RuntimeError("killed mid-write")

    atomic_write_bytes(path, b"old")
    with pytest.raises(TypeError):
        atomic_write_bytes(path, Boom())  # a failed write leaves the old file and no temporary one
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["r.jsonl", "x.json"]
