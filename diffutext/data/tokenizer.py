"""Tokenizers: train a BPE vocabulary on the training split, or load a given `tokenizer.json`.

Trained tokenizers are byte-pair encodings over a Metaspace pre-tokeniser (lossless decode, case
kept) with four special tokens [PAD] [UNK] [CLS] [SEP]. BPE training is deterministic: the same
corpus gives the same ids. A given `tokenizer.json` (a bert-base-uncased vocabulary for DiffuSeq
parity, say) must define [PAD], [CLS] and [SEP]; its own post-processor is bypassed because the
packer adds the special tokens itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")


class TokenizerError(ValueError):
    pass


@dataclass(frozen=True)
class Vocab:
    """A tokenizer plus the ids of the special tokens the packer needs."""

    tokenizer: Tokenizer
    pad: int
    cls: int
    sep: int

    @property
    def size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[list[int]]) -> list[str]:
        return [s.strip() for s in self.tokenizer.decode_batch(ids, skip_special_tokens=True)]

    def to_str(self) -> str:
        return self.tokenizer.to_str()


def train_bpe(texts: Iterable[str], vocab_size: int) -> Vocab:
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return _wrap(tok, "trained tokenizer")


def from_str(text: str, where: str = "tokenizer") -> Vocab:
    try:
        tok = Tokenizer.from_str(text)
    except Exception as e:  # the Rust side raises plain Exception subclasses
        raise TokenizerError(f"{where}: not a valid tokenizer.json ({str(e).splitlines()[0][:120]})") from None
    return _wrap(tok, where)


def load(path: Path) -> Vocab:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TokenizerError(f"{path}: tokenizer file not found") from None
    except (UnicodeDecodeError, IsADirectoryError):
        raise TokenizerError(f"{path}: not a tokenizer.json text file") from None
    return from_str(text, str(path))


def _wrap(tok: Tokenizer, where: str) -> Vocab:
    ids = {name: tok.token_to_id(name) for name in ("[PAD]", "[CLS]", "[SEP]")}
    missing = [name for name, i in ids.items() if i is None]
    if missing:
        raise TokenizerError(f"{where}: vocabulary lacks the special token(s) {', '.join(missing)}")
    return Vocab(tok, pad=ids["[PAD]"], cls=ids["[CLS]"], sep=ids["[SEP]"])
