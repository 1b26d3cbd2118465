"""DiffuSeq's jsonl files, read strictly: one line, one example, or one clear error.

A line is `{"src": ..., "trg": ...}` (a pair, DiffuSeq's format) or `{"src": ..., "refs": [...]}`
(a source with several references, for evaluation); both keys together mean the pair's target
plus more references. Every problem (unreadable file, invalid UTF-8, a line that is not a JSON
object, a missing, non-string or empty field, a lone surrogate escape that no tokenizer can
encode, an empty file) raises `TaskError` naming the file, the line number and what was
expected. Extra keys are ignored. Blank lines are skipped; a UTF-8 byte-order mark is allowed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


class TaskError(ValueError):
    """A task name, folder or file that cannot be used; the message names it and what was expected."""


class MissingSplit(TaskError):
    """A task that has no such split (training goes on without validation when "valid" is missing)."""


EXPECTED = '{"src": ..., "trg": ...} or {"src": ..., "refs": [...]}'


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


def _text(value, where: str, key: str) -> str:
    if not isinstance(value, str):
        raise TaskError(f"{where}: field {key!r} must be a string, got {type(value).__name__} (expected {EXPECTED})")
    if not value.strip():
        raise TaskError(f"{where}: field {key!r} is empty (expected {EXPECTED})")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise TaskError(f"{where}: field {key!r} holds a lone surrogate escape (\\ud800-\\udfff); expected encodable text") from None
    return value


def parse_line(obj, where: str, need_target: bool = True) -> tuple[str, list[str]]:
    """The (src, refs) of one parsed line; refs may be empty only when need_target is False."""
    if not isinstance(obj, dict):
        raise TaskError(f"{where}: expected a JSON object {EXPECTED}, got {type(obj).__name__}")
    if "src" not in obj:
        raise TaskError(f"{where}: missing field 'src' (expected {EXPECTED})")
    src = _text(obj["src"], where, "src")
    refs: list[str] = []
    if "trg" in obj:
        refs.append(_text(obj["trg"], where, "trg"))
    if "refs" in obj:
        if not isinstance(obj["refs"], list) or not obj["refs"]:
            raise TaskError(f"{where}: field 'refs' must be a non-empty list of strings (expected {EXPECTED})")
        for i, r in enumerate(obj["refs"]):
            r = _text(r, where, f"refs[{i}]")
            if r not in refs:
                refs.append(r)
    if need_target and not refs:
        raise TaskError(f"{where}: missing field 'trg' (expected {EXPECTED})")
    return src, refs


def read_jsonl(path: Path, need_target: bool = True) -> Rows:
    """Every example of a DiffuSeq jsonl file, checked line by line."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TaskError(f"{path}: file not found (expected a DiffuSeq .jsonl file)") from None
    except IsADirectoryError:
        raise TaskError(f"{path}: is a folder, expected a .jsonl file") from None
    except OSError as e:
        raise TaskError(f"{path}: cannot read ({e.strerror})") from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    rows = Rows()
    for lineno, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TaskError(f"{where}: not valid UTF-8 (byte {e.start} of the line; expected UTF-8 text)") from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise TaskError(f"{where}: not a JSON object ({e.msg}, column {e.colno}; expected {EXPECTED})") from None
        except ValueError as e:  # e.g. an integer literal longer than Python's 4300-digit limit
            raise TaskError(f"{where}: not a usable JSON object ({str(e).splitlines()[0][:80]}; expected {EXPECTED})") from None
        except RecursionError:
            raise TaskError(f"{where}: JSON nested too deeply (expected {EXPECTED})") from None
        src, refs = parse_line(obj, where, need_target)
        rows.src.append(src)
        rows.refs.append(refs)
    if not rows.src:
        raise TaskError(f"{path}: no examples (the file is empty; expected one {EXPECTED} per line)")
    return rows
