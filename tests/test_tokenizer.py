import json

import pytest

from transfusion_mot.batch import SpecialTokens
from transfusion_mot.common.errors import ConfigError
from transfusion_mot.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    TokenizerConfig,
    encode_caption,
    load_tokenizer,
    train_tokenizer,
    train_tokenizer_from_folder,
)

UNICODE = ["", "a red circle", "naïve café — “quotes”", "中文字符 and 日本語", "emoji 🦄🔥👩‍👩‍👧 mix",
           "  leading and trailing  ", "tabs\tand\nnewlines\r\n", "\x00 nul byte", "Ωmega ∑ 🏳️‍🌈"]


def corpus() -> list[str]:
    colors = ["red", "green", "blue", "yellow", "purple", "orange"]
    shapes = ["circle", "square", "triangle", "star"]
    backs = ["white", "black", "gray"]
    return [f"a {c} {s} on a {b} background" for c in colors for s in shapes for b in backs] * 3


HELD_OUT = ["a small teal hexagon at the top left", "two red squares", "a 🦄 on the moon",
            "Ünïcödé and  double  spaces", "numbers 0123456789 and symbols !@#$%^&*()"]


def test_byte_tokenizer_round_trip_and_specials():
    tok = ByteTokenizer()
    assert tok.vocab_size == 261
    assert tok.specials == SpecialTokens.at_end_of_vocab(261)
    assert (tok.specials.bos, tok.specials.eoi) == (256, 260)
    for text in UNICODE:
        ids = tok.encode(text)
        assert all(0 <= i < 256 for i in ids)
        assert tok.decode(ids) == text
    ids = tok.encode("hi")
    assert tok.decode([tok.specials.bos, *ids, tok.specials.eos, tok.specials.pad]) == "hi"
    assert tok.decode([0xF0, 0x9F]) == "\ufffd"  # a cut multi-byte char never raises


def test_trained_bpe_round_trip_held_out(tmp_path):
    tok = train_tokenizer(corpus(), 320, tmp_path / "tokenizer.json")
    assert isinstance(tok, HFTokenizer)
    assert 261 < tok.vocab_size <= 320
    assert tok.specials == SpecialTokens.at_end_of_vocab(tok.vocab_size)
    for text in HELD_OUT + UNICODE:
        ids = tok.encode(text)
        assert tok.decode(ids) == text, text
        assert all(0 <= i < tok.vocab_size - 5 for i in ids)  # text ids never collide with specials
    # merges were learned: a seen caption is much shorter than its bytes
    seen = corpus()[0]
    assert len(tok.encode(seen)) < len(seen.encode()) // 2
    sp = tok.specials
    assert len({sp.bos, sp.eos, sp.pad, sp.boi, sp.eoi}) == 5
    assert min(sp.bos, sp.eos, sp.pad, sp.boi, sp.eoi) == tok.vocab_size - 5
    assert tok.decode([sp.bos, *tok.encode("a red star"), sp.eos]) == "a red star"


def test_training_is_deterministic(tmp_path):
    a = train_tokenizer(corpus(), 300, tmp_path / "a.json")
    b = train_tokenizer(corpus(), 300, tmp_path / "b.json")
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()
    assert a.encode(HELD_OUT[0]) == b.encode(HELD_OUT[0])


def test_train_rejects_tiny_vocab(tmp_path):
    with pytest.raises(ValueError, match="at least 261"):
        train_tokenizer(corpus(), 100, tmp_path / "t.json")


def test_load_from_path_and_missing_file(tmp_path):
    path = tmp_path / "tok" / "tokenizer.json"
    trained = train_tokenizer(corpus(), 300, path)
    for spec in (path, str(path), TokenizerConfig(kind="hf", path=str(path))):
        tok = load_tokenizer(spec)
        assert isinstance(tok, HFTokenizer) and tok.vocab_size == trained.vocab_size
        assert tok.encode("a red circle") == trained.encode("a red circle")
    assert isinstance(load_tokenizer("bytes"), ByteTokenizer)
    assert isinstance(load_tokenizer(TokenizerConfig()), ByteTokenizer)
    with pytest.raises(FileNotFoundError) as err:
        load_tokenizer(tmp_path / "nope.json")
    msg = str(err.value)
    assert "nope.json" in msg and "tmot data tokenizer" in msg and "\n" not in msg
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        load_tokenizer(bad)


def test_file_special_tokens_are_not_ours(tmp_path):
    """A tokenizer.json with its own added special token: ours still come after it."""
    path = tmp_path / "tokenizer.json"
    train_tokenizer(corpus(), 300, path)
    data = json.loads(path.read_text())
    size = len(data["model"]["vocab"])
    data["added_tokens"] = [{"id": size, "content": "<|endoftext|>", "single_word": False, "lstrip": False,
                             "rstrip": False, "normalized": False, "special": True}]
    path.write_text(json.dumps(data))
    tok = HFTokenizer(path)
    assert tok.vocab_size == size + 1 + 5
    assert tok.specials.bos == size + 1
    ids = tok.encode("a<|endoftext|>b")
    assert size in ids and tok.decode(ids) == "a<|endoftext|>b"


def test_overflow_error_and_truncate():
    tok = ByteTokenizer()
    assert encode_caption(tok, "abc", 3) == [97, 98, 99]
    with pytest.raises(ValueError) as err:
        encode_caption(tok, "abcdef", 4)
    assert str(err.value) == ("caption has 6 tokens, more than max_text_tokens=4; "
                              "set overflow: truncate to cut it")
    assert encode_caption(tok, "abcdef", 4, overflow="truncate") == [97, 98, 99, 100]
    assert encode_caption(tok, "abcdef", None) == list(b"abcdef")
    with pytest.raises(ValueError, match="overflow"):
        encode_caption(tok, "abc", 2, overflow="drop")


def test_tokenizer_config_validation():
    with pytest.raises(ConfigError, match="kind"):
        TokenizerConfig(kind="sentencepiece")
    with pytest.raises(ConfigError, match="needs path"):
        load_tokenizer(TokenizerConfig(kind="hf"))  # the library needs the file; a run trains it first
    from transfusion_mot.config import run_config_from_dict

    # a run config may leave the path to the run, which trains a BPE on its data's captions
    assert run_config_from_dict({"tokenizer": {"kind": "hf"}, "data": {"path": "somewhere"}}).tokenizer.path is None
    assert run_config_from_dict({"tokenizer": {"kind": "hf"}, "data": {"builtin": "shapes"}}).tokenizer.path is None
    with pytest.raises(ConfigError, match="overflow"):
        TokenizerConfig(overflow="cut")
    with pytest.raises(ConfigError, match="max_text_tokens"):
        TokenizerConfig(max_text_tokens=0)


def test_train_from_folder_uses_train_captions(tmp_path):
    rows = [{"file_name": f"{i}.png", "text": t, "split": "val" if i % 10 == 0 else "train"}
            for i, t in enumerate(corpus())]
    rows.append({"file_name": "x.png", "text": "no split field counts as train"})
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    tok = train_tokenizer_from_folder(tmp_path, 300, tmp_path / "tokenizer.json")
    assert (tmp_path / "tokenizer.json").is_file()
    assert tok.decode(tok.encode(HELD_OUT[2])) == HELD_OUT[2]
    with pytest.raises(FileNotFoundError, match="metadata.jsonl"):
        train_tokenizer_from_folder(tmp_path / "missing", 300, tmp_path / "t.json")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metadata.jsonl").write_text("")
    with pytest.raises(ValueError, match="no training captions"):
        train_tokenizer_from_folder(empty, 300, empty / "t.json")
    assert not (empty / "t.json").exists()
    with pytest.raises(ValueError, match="^my captions: no training captions to learn from$"):
        train_tokenizer(iter([]), 300, empty / "u.json", source="my captions")
    assert not (empty / "u.json").exists()
