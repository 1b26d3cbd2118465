"""DiffuSeq jsonl files as Arrow tables: parsed in C, checked column-wise, cached on disk, memory-mapped.

A split file is checked to be UTF-8, parsed by pyarrow's JSON reader into columns, and the
columns are checked with vectorised kernels: one JSON object per line, `src`/`trg` strings that
are present and not blank (blank as Python's `str.strip` sees it). Whenever the reader fails or
a check finds something, the file is read again by the strict line reader of `jsonl.py`, which
either names the bad line (the same one-line `TaskError` as always) or reads what Arrow could
not: lines with `refs` (multi-reference sets, whose references are merged line by line) and odd
but valid layouts.
One known difference: an ignored extra key whose value Python's `json` refuses (an integer of
more than 4,300 digits, nesting deeper than Python's recursion limit) passes here. A file with a
line that is `null` never reaches Arrow: pyarrow 26's JSON reader crashes on it (see `_null_line`).

Files of `CACHE_MIN_BYTES` or more are written once, per form ("pairs" for training, "eval"
with every reference), as an Arrow file under `$HF_DATASETS_CACHE/diffutext/` (by default
~/.cache/huggingface/datasets/diffutext/), named by a key of the file's absolute path, size and
modification time; later loads memory-map that file and parse nothing. Smaller files stay in
memory (reading them costs less than a cache file would, and they leave nothing behind).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

from .jsonl import Rows, read_bytes, read_jsonl

FORMAT = 1  # bump when the cached layout changes: old cache files are then never read
CACHE_MIN_BYTES = 1 << 20

# Every character for which str.isspace() is true (tests/test_data.py checks the list against Python).
PY_WHITESPACE = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007"
    "\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
_BLANK = "^[" + "".join(f"\\x{{{ord(c):x}}}" for c in PY_WHITESPACE) + "]*$"  # RE2: empty or only whitespace
_BLANK_LINE = re.compile(rb"\n[ \t\r\x0b\x0c]*(?=\n)")  # a blank line between two others, as bytes.strip() sees it
_TWO_OBJECTS = re.compile(rb"\}[ \t\r]*\{")  # "} {" on one line: two objects there (or text holding "}{": re-read)
_SCHEMA = pa.schema([("src", pa.string()), ("trg", pa.string()), ("refs", pa.list_(pa.string()))])
_PARSE = pj.ParseOptions(explicit_schema=_SCHEMA, unexpected_field_behavior="ignore")
_READ = pj.ReadOptions(block_size=1 << 24)  # a line longer than a block fails here and goes to the strict reader


def cache_dir() -> Path:
    """Where the Arrow files go: $HF_DATASETS_CACHE (read at call time), else datasets' default, + /diffutext."""
    root = os.environ.get("HF_DATASETS_CACHE", "").strip()
    if not root:
        import datasets

        root = str(datasets.config.HF_DATASETS_CACHE)
    return Path(root).expanduser() / "diffutext"


def file_key(path: Path, form: str, need_target: bool) -> str:
    """Names one form of one version of a file: its absolute path, size and modification time."""
    st = path.stat()
    ident = [FORMAT, form, need_target, str(path.resolve()), st.st_size, st.st_mtime_ns]
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:32]


# ---- reading ----


def _nonblank_lines(data: bytes) -> int:
    """Lines holding more than ASCII whitespace, split on "\\n" as the strict reader splits them."""
    n = data.count(b"\n") + 1
    blank = len(_BLANK_LINE.findall(data))
    first_end = data.find(b"\n")
    blank += not data[: first_end if first_end >= 0 else len(data)].strip()
    if first_end >= 0:
        blank += not data[data.rfind(b"\n") + 1 :].strip()
    return n - blank


def _null_line(data: bytes) -> bool:
    """Whether some line's value starts with `null`: pyarrow's JSON reader crashes (segfault) on one that starts a
    block (apache/arrow#47409, pyarrow 26), so such files go to the strict reader (which rejects the line)."""
    i = data.find(b"null")
    while i >= 0:  # one step per occurrence of "null" in the file, rare in text
        j = i - 1
        while j >= 0 and data[j] in b" \t":
            j -= 1
        if j < 0 or data[j] in b"\r\n" or (j == 2 and data.startswith(b"\xef\xbb\xbf")):
            return True
        i = data.find(b"null", i + 4)
    return False


def _utf8(data: bytes) -> bool:
    """Whether the whole file is valid UTF-8 (Arrow's JSON reader does not check strings it is not asked to)."""
    offsets = pa.array([0, len(data)], pa.int64()).buffers()[1]
    text = pa.Array.from_buffers(pa.large_string(), 1, [None, offsets, pa.py_buffer(data)])  # no copy
    try:
        text.validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True


def _any_blank(column) -> bool:
    return bool(pc.any(pc.match_substring_regex(column, _BLANK)).as_py())


def fast_pairs(data: bytes, need_target: bool = True) -> pa.Table | None:
    """Columns src, trg (null where a line has none) when every line is a plain pair that passes the checks, else None."""
    if not _utf8(data) or _null_line(data):
        return None
    try:
        table = pj.read_json(pa.BufferReader(data), read_options=_READ, parse_options=_PARSE)
        table.select(["src", "trg"]).validate(full=True)
    except Exception:  # any parse failure (ArrowInvalid, a decode error, ...): the strict reader finds the line
        return None
    if table.num_rows == 0 or table.num_rows != _nonblank_lines(data) or _TWO_OBJECTS.search(data):
        return None
    if table["refs"].null_count != table.num_rows:
        return None  # multi-reference lines: their references are merged by the strict reader
    src, trg = table["src"], table["trg"]
    if src.null_count or _any_blank(src) or (need_target and trg.null_count) or _any_blank(trg):
        return None
    return table.select(["src", "trg"])


def _with_refs(pairs: pa.Table) -> pa.Table:
    """Evaluation form of plain pairs: trg ("" where missing) and refs ([trg], or [] where missing)."""
    trg = pairs["trg"].combine_chunks()
    offsets = pa.concat_arrays([pa.array([0], pa.int32()), pc.cumulative_sum(pc.cast(pc.is_valid(trg), pa.int32()))])
    refs = pa.ListArray.from_arrays(offsets, trg.drop_null())
    return pa.table({"src": pairs["src"], "trg": pc.fill_null(trg, ""), "refs": refs})


def rows_table(rows: Rows, form: str) -> pa.Table:
    """A Rows (the strict reader's, the hub's, ...) as a table of the given form."""
    if form == "pairs":
        src, trg = rows.pairs()
        return pa.table({"src": pa.array(src, pa.string()), "trg": pa.array(trg, pa.string())})
    return pa.table(
        {
            "src": pa.array(rows.src, pa.string()),
            "trg": pa.array([r[0] if r else "" for r in rows.refs], pa.string()),
            "refs": pa.array(rows.refs, pa.list_(pa.string())),
        }
    )


def read_table(path: Path, form: str, need_target: bool = True) -> pa.Table:
    """One file as a table of the given form ("pairs": src, trg; "eval": src, trg, refs); TaskError names a bad line."""
    data = read_bytes(path)
    pairs = fast_pairs(data, need_target)
    if pairs is None:  # a problem somewhere, or lines Arrow does not read as we do: the line-by-line reader decides
        return rows_table(read_jsonl(path, need_target, data), form)
    return pairs if form == "pairs" else _with_refs(pairs)


# ---- the cache ----


def _write(table: pa.Table, target: Path) -> None:
    """An Arrow stream file (the layout `datasets` memory-maps), written beside the target and renamed into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"diffutext_rows": str(table.num_rows).encode()})
    try:
        with open(tmp, "wb") as f:
            with pa.ipc.new_stream(f, table.schema) as writer:
                writer.write_table(table, max_chunksize=1 << 16)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _open(target: Path, key: str):
    """The cached file, memory-mapped; ArrowInvalid when it is not whole (rows written != rows read)."""
    import datasets
    from datasets.table import MemoryMappedTable

    table = MemoryMappedTable.from_file(str(target))
    written = (table.schema.metadata or {}).get(b"diffutext_rows")
    if written is None or int(written) != table.num_rows:
        raise pa.ArrowInvalid(f"{target}: holds {table.num_rows} rows, {written} were written")
    return datasets.Dataset(table, fingerprint=key)


def in_memory(table: pa.Table):
    import datasets
    from datasets.table import InMemoryTable

    return datasets.Dataset(InMemoryTable(table))


def load(path: Path, form: str, need_target: bool = True):
    """One split file as a `datasets.Dataset` of the given form: memory-mapped from the cache when large enough."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError:
        size = 0  # read_bytes names the problem
    if size < CACHE_MIN_BYTES:
        return in_memory(read_table(path, form, need_target))
    key = file_key(path, form, need_target)
    target = cache_dir() / f"{form}-{key}.arrow"
    if target.is_file():
        try:
            return _open(target, key)
        except (pa.ArrowException, OSError):
            target.unlink(missing_ok=True)  # a damaged cache file: read the jsonl again
    table = read_table(path, form, need_target)
    try:
        _write(table, target)
    except OSError:
        return in_memory(table)  # an unwritable cache folder: work from memory
    return _open(target, key)
