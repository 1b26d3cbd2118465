"""DiffuSeq's jsonl files, read strictly: one line, one example, or one clear error.

A line is `{"src": ..., "trg": ...}` (a pair, DiffuSeq's format) or `{"src": ..., "refs": [...]}`
(a source with several references, for evaluation); both keys together mean the pair's target
plus more references. Every problem (unreadable file, invalid UTF-8, a line that is not a JSON
object, a missing, non-string or empty field, a lone surrogate escape that no tokenizer can
encode, an empty file) raises `TaskError` naming the file, the line number and what was
expected. Extra keys are ignored. Blank lines are skipped; a UTF-8 byte-order mark is allowed.

This is the reference reader, a Python loop over lines: `store.py` reads large files with
Arrow and comes back here to name the line whenever its vectorised checks find a problem.
`read_predictions` reads `diffutext sample --out` files ({"src", "trg" | "refs", "hyp"})
with the same line reader and the same reference rules.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


class TaskError(ValueError):
    """A task name, folder or file that cannot be used; the message names it and what was expected."""


class MissingSplit(TaskError):
    """A task that has no such split (training goes on without validation when "valid" is missing)."""


EXPECTED = '{"src": ..., "trg": ...} or {"src": ..., "refs": [...]}'
PREDICTION = '{"src", "trg", "hyp"} as written by diffutext sample --out'


@dataclass
class Rows:
    """Sources and, per source, their references (the first one is the pair's target)."""

    src: list[str] = field(default_factory=list)
    refs: list[list[str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.src)

    def pairs(self) -> tuple[list[str], list[str]]:
        """One (src, trg) pair per reference: how multi-reference data is trained on."""
        src = [s for s, rs in zip(self.src, self.refs) for _ in rs]
        trg = [r for rs in self.refs for r in rs]
        return src, trg


class _FieldError(Exception):
    """One field of a parsed line is unusable; the caller words the message for its kind of file."""

    def __init__(self, key: str, problem: str):
        super().__init__(key, problem)
        self.key, self.problem = key, problem

    def message(self, where: str) -> str:
        tail = "; expected encodable text" if self.problem.startswith("holds") else f" (expected {EXPECTED})"
        return f"{where}: field {self.key!r} {self.problem}{tail}"


def _text(value, key: str) -> str:
    if not isinstance(value, str):
        raise _FieldError(key, f"must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _FieldError(key, "is empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _FieldError(key, "holds a lone surrogate escape (\\ud800-\\udfff)") from None
    return value


def _references(obj: dict) -> list[str]:
    """The target, then every further reference of `refs` not seen before (order kept)."""
    refs: list[str] = []
    if "trg" in obj:
        refs.append(_text(obj["trg"], "trg"))
    if "refs" in obj:
        if not isinstance(obj["refs"], list) or not obj["refs"]:
            raise _FieldError("refs", "must be a non-empty list of strings")
        for i, r in enumerate(obj["refs"]):
            r = _text(r, f"refs[{i}]")
            if r not in refs:
                refs.append(r)
    return refs


def parse_line(obj, where: str, need_target: bool = True) -> tuple[str, list[str]]:
    """The (src, refs) of one parsed line; refs may be empty only when need_target is False."""
    if not isinstance(obj, dict):
        raise TaskError(f"{where}: expected a JSON object {EXPECTED}, got {type(obj).__name__}")
    if "src" not in obj:
        raise TaskError(f"{where}: missing field 'src' (expected {EXPECTED})")
    try:
        src = _text(obj["src"], "src")
        refs = _references(obj)
    except _FieldError as e:
        raise TaskError(e.message(where)) from None
    if need_target and not refs:
        raise TaskError(f"{where}: missing field 'trg' (expected {EXPECTED})")
    return src, refs


def read_bytes(path: Path) -> bytes:
    """A file's bytes, or TaskError naming it (missing, a folder, unreadable)."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise TaskError(f"{path}: file not found (expected a DiffuSeq .jsonl file)") from None
    except IsADirectoryError:
        raise TaskError(f"{path}: is a folder, expected a .jsonl file") from None
    except OSError as e:
        raise TaskError(f"{path}: cannot read ({e.strerror})") from None


def objects(path: Path, data: bytes, expected: str = EXPECTED) -> Iterator[tuple[str, object]]:
    """("file:line", parsed JSON value) for every non-blank line; TaskError on text or JSON that does not parse.

    Lines are split on "\\n" only (JSON strings may hold U+2028, \\x1c, ...), a leading byte-order mark is dropped.
    """
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    for lineno, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TaskError(f"{where}: not valid UTF-8 (byte {e.start} of the line; expected UTF-8 text)") from None
        try:
            yield where, json.loads(text)
        except json.JSONDecodeError as e:
            raise TaskError(f"{where}: not a JSON object ({e.msg}, column {e.colno}; expected {expected})") from None
        except ValueError as e:  # e.g. an integer literal longer than Python's 4300-digit limit
            raise TaskError(f"{where}: not a usable JSON object ({str(e).splitlines()[0][:80]}; expected {expected})") from None
        except RecursionError:
            raise TaskError(f"{where}: JSON nested too deeply (expected {expected})") from None


def iter_examples(path: Path, need_target: bool = True, data: bytes | None = None) -> Iterator[tuple[str, list[str]]]:
    """(src, refs) for every line of a DiffuSeq jsonl file, checked as it goes."""
    path = Path(path)
    data = read_bytes(path) if data is None else data
    for where, obj in objects(path, data):
        yield parse_line(obj, where, need_target)


def read_jsonl(path: Path, need_target: bool = True, data: bytes | None = None) -> Rows:
    """Every example of a DiffuSeq jsonl file, checked line by line."""
    rows = Rows()
    for src, refs in iter_examples(path, need_target, data):
        rows.src.append(src)
        rows.refs.append(refs)
    if not rows.src:
        raise TaskError(f"{path}: no examples (the file is empty; expected one {EXPECTED} per line)")
    return rows


def read_predictions(path: Path) -> tuple[list[str], list[list[str]]]:
    """A predictions file ({"src", "trg" | "refs", "hyp"} per line): the hypotheses and each one's references.

    `hyp` may be empty (a model can emit nothing); the references follow the rules of task files (the
    target first, then every new entry of `refs`), and each line needs at least one.
    """
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"{path}: predictions file not found")
    hyps: list[str] = []
    refs: list[list[str]] = []
    for where, obj in objects(path, read_bytes(path), PREDICTION):
        if not isinstance(obj, dict):
            raise TaskError(f'{where}: expected a JSON object with "hyp" and "trg" (or "refs")')
        hyp = obj.get("hyp")
        if not isinstance(hyp, str):
            raise TaskError(f"{where}: missing string field 'hyp' (expected {PREDICTION})")
        try:
            ref = _references(obj)
            problem = "" if ref else "; it has neither"
        except _FieldError as e:
            ref, problem = [], f"; field {e.key!r} {e.problem}"
        if not ref:
            raise TaskError(f"{where}: needs a non-empty reference: 'trg' (a string) or 'refs' (a list of strings){problem}")
        hyps.append(hyp)
        refs.append(ref)
    if not hyps:
        raise TaskError(f"{path}: no predictions (the file is empty)")
    return hyps, refs


DECODED = '{"recover", "reference", "source"} as written by DiffuSeq\'s sample_seq2seq.py'


def is_decoded_file(path: Path) -> bool:
    """Whether a predictions file is one of DiffuSeq's decoded files (its first line has "recover")."""
    for _, obj in objects(Path(path), read_bytes(path), DECODED):
        return isinstance(obj, dict) and "recover" in obj
    return False


def read_decoded(path: Path) -> list[tuple[str, str, str]]:
    """A DiffuSeq decoded file: (recover, reference, source) per line, as stored (special tokens and all).
    `recover` may be empty; every field must be a string."""
    path = Path(path)
    rows = []
    for where, obj in objects(path, read_bytes(path), DECODED):
        if not isinstance(obj, dict):
            raise TaskError(f"{where}: expected a JSON object {DECODED}")
        for key in ("recover", "reference", "source"):
            if not isinstance(obj.get(key), str):
                raise TaskError(f"{where}: missing string field {key!r} (expected {DECODED})")
        rows.append((obj["recover"], obj["reference"], obj["source"]))
    if not rows:
        raise TaskError(f"{path}: no decoded lines (the file is empty)")
    return rows


def decoded_files(folder: Path) -> list[Path]:
    """The seed files of a DiffuSeq output folder as its eval_seq2seq.py takes them: names ending in "json", sorted."""
    files = sorted(p for p in Path(folder).iterdir() if p.name.endswith("json") and p.is_file())
    if not files:
        raise TaskError(f"{folder}: no decoded files (expected DiffuSeq's seed*.json files, one per decoding seed)")
    return files
