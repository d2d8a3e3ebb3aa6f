"""Text tokenizers: raw UTF-8 bytes, or a byte-level BPE (Hugging Face `tokenizers`) read from tokenizer.json.

Both follow the vocabulary convention of `transfusion_mot.batch.SpecialTokens.at_end_of_vocab`: the text
ids come first and the model's five special tokens (BOS, EOS, PAD, BOI, EOI) are the last five ids. So a
model's `vocab_size` is always `tokenizer.vocab_size` (which already counts the specials), and `encode`
never emits a special id: the collator adds them.

For a BPE tokenizer with V entries in tokenizer.json (added tokens included), ids 0..V-1 are the file's
and our specials are appended as V..V+4. Special tokens defined inside the file (e.g. "<|endoftext|>") are
NOT used as ours: they stay ordinary ids of the file, which keeps any tokenizer.json usable as it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Protocol, Sequence, Union

from .batch import SpecialTokens
from .common.errors import ConfigError, InputNotFound, InvalidInput
from .config import APPENDED_TOKENS, OVERFLOW_CHOICES, TokenizerConfig

NUM_SPECIALS = 5


class Tokenizer(Protocol):
    vocab_size: int
    specials: SpecialTokens

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
    """ids 0..255 are UTF-8 bytes; 256..260 the specials. No file, no training, any text round-trips."""

    vocab_size = 256 + NUM_SPECIALS

    def __init__(self) -> None:
        self.specials = SpecialTokens.at_end_of_vocab(self.vocab_size)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        """Special ids (and anything out of range) are dropped; invalid UTF-8 becomes U+FFFD, never an error."""
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=261)"


class HFTokenizer:
    """A Hugging Face `tokenizers.Tokenizer` from a local tokenizer.json, with our specials appended."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as _HFTok

        path = Path(path)
        if not path.is_file():
            raise InputNotFound(f"tokenizer file not found: {path} (train one with `tmot data tokenizer "
                                    f"--data DIR --out {path}` or use tokenizer kind 'bytes')")
        try:
            self.tok = _HFTok.from_file(str(path))
        except Exception as err:  # the Rust side raises a bare Exception on malformed json
            raise InvalidInput(f"{path}: not a valid tokenizer.json ({str(err).splitlines()[0]})") from None
        self.path = path
        self.text_vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.vocab_size = self.text_vocab_size + NUM_SPECIALS
        self.specials = SpecialTokens.at_end_of_vocab(self.vocab_size)

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Our special ids are dropped; the file's own special tokens are kept (they are plain text to us)."""
        keep = [int(i) for i in ids if 0 <= int(i) < self.text_vocab_size]
        return self.tok.decode(keep, skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def load_pretrained_tokenizer(source: str | Path):
    """transformers' AutoTokenizer from a directory or Hub id; a failure is one line naming the source."""
    from transformers import AutoTokenizer

    from .common.errors import describe

    try:
        return AutoTokenizer.from_pretrained(str(source))
    except Exception as err:  # missing files, offline hub, a repo without a tokenizer
        raise InvalidInput(f"cannot load a tokenizer from {source} ({describe(err)}); pass a directory or Hub id "
                           "of a transformers tokenizer (tokenizer.path)") from None


class PretrainedTokenizer:
    """A pretrained language model's own tokenizer (transformers `AutoTokenizer`), unchanged: every id it
    produces is the LM's id, documents start with its BOS where it adds one (Llama) and nothing where it adds
    none (Qwen), and end with its EOS. BOI and EOI are new ids after the LM's embedding rows
    (`base_vocab_size`, which may exceed the tokenizer's length: Qwen pads its table), and padding uses the
    tokenizer's pad token, else its EOS (padding is masked and never a target)."""

    def __init__(self, source: str | Path, base_vocab_size: int) -> None:
        self.tok = load_pretrained_tokenizer(source)
        self.source = str(source)
        self.text_vocab_size = len(self.tok)
        if self.text_vocab_size > base_vocab_size:
            raise InvalidInput(f"tokenizer {source} has {self.text_vocab_size} tokens but the language model has "
                               f"{base_vocab_size} embedding rows: a tokenizer of another model")
        if self.tok.eos_token_id is None:
            raise InvalidInput(f"tokenizer {source} has no EOS token: documents need one to end")
        probe = self.tok("a", add_special_tokens=True)["input_ids"]
        bos = self.tok.bos_token_id
        self.adds_bos = bos is not None and len(probe) > 0 and probe[0] == bos
        self.vocab_size = base_vocab_size + len(APPENDED_TOKENS)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        self.specials = SpecialTokens(bos=bos if self.adds_bos else None, eos=int(self.tok.eos_token_id),
                                      pad=int(pad), boi=base_vocab_size, eoi=base_vocab_size + 1)

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Iterable[int]) -> str:
        """The appended ids are dropped; the LM's own special tokens are kept as text."""
        keep = [int(i) for i in ids if 0 <= int(i) < self.text_vocab_size]
        return self.tok.decode(keep, skip_special_tokens=False)

    def save_pretrained(self, directory: str | Path) -> None:
        self.tok.save_pretrained(str(directory))

    def __repr__(self) -> str:
        return f"PretrainedTokenizer({self.source!r}, vocab_size={self.vocab_size})"


AnyTokenizer = Union[ByteTokenizer, HFTokenizer, PretrainedTokenizer]


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_path: str | Path,
                    source: str = "the texts") -> HFTokenizer:
    """Train a byte-level BPE on `texts` and save it as tokenizer.json at `out_path`.

    `vocab_size` is the MODEL's vocabulary, the 5 specials included, so it can go into the model config as
    is; the file gets `vocab_size - 5` entries, or fewer when the corpus runs out of pairs to merge (read
    the returned tokenizer's `vocab_size`). All 256 byte symbols are always in the alphabet, so any text
    round-trips. Same texts in the same order -> the same file, written to a temporary name and renamed, so a
    tokenizer file that exists is complete.
    """
    from tokenizers import Tokenizer as _HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + NUM_SPECIALS:
        raise InvalidInput(f"vocab_size must be at least {256 + NUM_SPECIALS} (256 byte symbols + 5 specials), "
                         f"got {vocab_size}")
    tok = _HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - NUM_SPECIALS, min_frequency=2, show_progress=False,
                                  special_tokens=[], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    count = 0

    def counted() -> Iterator[str]:
        nonlocal count
        for text in texts:
            count += 1
            yield text

    tok.train_from_iterator(counted(), trainer=trainer)
    if count == 0:
        raise InvalidInput(f"{source}: no training captions to learn from")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(f".tmp-{out_path.name}")
    tok.save(str(partial))
    partial.replace(out_path)
    return HFTokenizer(out_path)


def train_tokenizer_from_folder(data_dir: str | Path, vocab_size: int, out: str | Path) -> HFTokenizer:
    """Train on the `text` field of DIR/metadata.jsonl (rows of split "train" or with no split: the
    validation captions stay unseen, like the validation images)."""
    from .data.imageio import folder_captions

    data_dir = Path(data_dir)
    if not (data_dir / "metadata.jsonl").is_file():
        raise InputNotFound(f"no metadata.jsonl in {data_dir} (expected an image folder made by "
                                f"`tmot data ...`)")
    return train_tokenizer(folder_captions(data_dir), vocab_size, out,
                           source=f"{data_dir / 'metadata.jsonl'} (field 'text')")


def load_tokenizer(config_or_spec: TokenizerConfig | str | Path | None = None, model_config=None) -> AnyTokenizer:
    """A tokenizer from a `TokenizerConfig`, the string "bytes" (or None), or a path to tokenizer.json. Kind
    "pretrained" needs the model config (`base_vocab_size`: where the appended ids start)."""
    if config_or_spec is None:
        return ByteTokenizer()
    if isinstance(config_or_spec, TokenizerConfig):
        if config_or_spec.kind == "bytes":
            return ByteTokenizer()
        if config_or_spec.kind == "pretrained":
            source = config_or_spec.path or (model_config.init_from if model_config is not None else None)
            if source is None or model_config is None or model_config.base_vocab_size is None:
                raise ConfigError("tokenizer kind 'pretrained' belongs to a model started from a language model: "
                                  "set model.init_from (the tokenizer comes from there unless tokenizer.path says)")
            return PretrainedTokenizer(source, model_config.base_vocab_size)
        if not config_or_spec.path:
            raise ConfigError("tokenizer config: kind 'hf' needs path: the tokenizer.json to load (`tmot train` "
                              "trains one on its data's training captions when path is null)")
        return HFTokenizer(config_or_spec.path)
    if str(config_or_spec) == "bytes":
        return ByteTokenizer()
    return HFTokenizer(config_or_spec)


def encode_caption(tokenizer: AnyTokenizer, text: str, max_text_tokens: int | None = None,
                   overflow: str = "error") -> list[int]:
    """Token ids of a caption (no specials), checked against `max_text_tokens`.

    overflow="error" raises ValueError naming both lengths; "truncate" keeps the FIRST max_text_tokens ids
    (the cut may fall inside a multi-byte character; decode then shows U+FFFD for the partial bytes).
    """
    if overflow not in OVERFLOW_CHOICES:
        raise ValueError(f"overflow must be one of {list(OVERFLOW_CHOICES)}, got {overflow!r}")
    ids = tokenizer.encode(text)
    if max_text_tokens is not None and len(ids) > max_text_tokens:
        if overflow == "error":
            raise InvalidInput(f"caption has {len(ids)} tokens, more than max_text_tokens={max_text_tokens}; "
                             f"set overflow: truncate to cut it")
        ids = ids[:max_text_tokens]
    return ids


def encode_captions(tokenizer: AnyTokenizer, texts: Sequence[str], config: TokenizerConfig) -> list[list[int]]:
    """`encode_caption` for each text with the limits of `config`."""
    return [encode_caption(tokenizer, t, config.max_text_tokens, config.overflow) for t in texts]
