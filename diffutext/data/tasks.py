"""Tasks: where (src, trg) pairs come from.

`--task` is either a registered name or a folder in DiffuSeq's format (`train.jsonl`,
`valid.jsonl`, `test.jsonl`, one `{"src": ..., "trg": ...}` per line). Two tasks ship inside the
package, built from public-domain Bible verses of at most 20 words: `bible-basic` (King James →
Bible in Basic English, a simplification) and `bible-modern` (King James → World English Bible, a
modernisation). Every split is returned as a Hugging Face `datasets.Dataset` with string columns
`src` and `trg`, so tokenisation can be mapped (and cached) the same way for every source.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

SPLITS = ("train", "valid", "test")


class TaskError(ValueError):
    """A task name, folder or file that cannot be used; the message names it and what was expected."""


@dataclass(frozen=True)
class EmbeddedTask:
    name: str
    target_column: str  # column of the embedded TSV that holds the target text
    description: str


EMBEDDED = {
    "bible-basic": EmbeddedTask("bible-basic", "BBE", "King James → Bible in Basic English (simplification)"),
    "bible-modern": EmbeddedTask("bible-modern", "WEB", "King James → World English Bible (modernisation)"),
}
DEFAULT_TASK = "bible-basic"


def _embedded_rows() -> list[list[str]]:
    raw = resources.files("diffutext.resources").joinpath("bible_short_verses.tsv.gz").read_bytes()
    text = gzip.decompress(raw).decode("utf-8")
    # The verses contain quote characters: read with quoting off so no quote ever spans lines.
    rows = list(csv.reader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE))
    return rows


def embedded_pairs(task: str, split: str) -> list[dict[str, str]]:
    spec = EMBEDDED[task]
    rows = _embedded_rows()
    header, body = rows[0], rows[1:]
    i_split, i_src, i_trg = header.index("split"), header.index("KJV"), header.index(spec.target_column)
    return [{"src": r[i_src], "trg": r[i_trg]} for r in body if r[i_split] == split]


def is_folder_task(task: str) -> bool:
    return task not in EMBEDDED and (os.sep in task or "/" in task or Path(task).is_dir())


def task_names() -> list[str]:
    return list(EMBEDDED)


def check_task(task: str) -> None:
    """Fail early, with one line, on a task that cannot be resolved."""
    if task in EMBEDDED:
        return
    if is_folder_task(task):
        folder = Path(task)
        if not folder.is_dir():
            raise TaskError(f"task folder {folder} does not exist")
        if not (folder / "train.jsonl").is_file():
            raise TaskError(f"task folder {folder} has no train.jsonl (expected DiffuSeq's train/valid/test.jsonl)")
        return
    raise TaskError(f"unknown task {task!r}: give one of {', '.join(task_names())} or a folder with train.jsonl/valid.jsonl/test.jsonl")


def validate_jsonl(path: Path, need_trg: bool = True) -> int:
    """Check every line of a DiffuSeq jsonl file; return the number of examples.

    Raises TaskError naming the file, the line and what was expected.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TaskError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise TaskError(f"{path}: is a folder, expected a .jsonl file") from None
    count = 0
    for lineno, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TaskError(f"{path}:{lineno}: not valid UTF-8 (byte {e.start})") from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise TaskError(f"{path}:{lineno}: not a JSON object ({e.msg})") from None
        if not isinstance(obj, dict):
            raise TaskError(f"{path}:{lineno}: expected a JSON object with \"src\" and \"trg\", got {type(obj).__name__}")
        fields = ("src", "trg") if need_trg else ("src",)
        for key in fields:
            if key not in obj:
                raise TaskError(f"{path}:{lineno}: missing field {key!r} (expected {{\"src\": ..., \"trg\": ...}})")
            if not isinstance(obj[key], str):
                raise TaskError(f"{path}:{lineno}: field {key!r} must be a string, got {type(obj[key]).__name__}")
            if not obj[key].strip():
                raise TaskError(f"{path}:{lineno}: field {key!r} is empty")
        count += 1
    if count == 0:
        raise TaskError(f"{path}: no examples (the file is empty)")
    return count


def load_split(task: str, split: str):
    """One split of a task as a `datasets.Dataset` with columns src, trg."""
    import datasets

    datasets.disable_progress_bars()
    check_task(task)
    if split not in SPLITS:
        raise TaskError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if task in EMBEDDED:
        pairs = embedded_pairs(task, split)
        return datasets.Dataset.from_dict({"src": [p["src"] for p in pairs], "trg": [p["trg"] for p in pairs]})
    path = Path(task) / f"{split}.jsonl"
    if not path.is_file():
        raise TaskError(f"task folder {task} has no {split}.jsonl")
    validate_jsonl(path)
    ds = datasets.load_dataset("json", data_files={split: str(path)}, split=split)
    return ds.select_columns(["src", "trg"])


def read_inputs(path: Path):
    """A user's input file for `sample --input`: jsonl with src (trg optional), as a Dataset."""
    import datasets

    datasets.disable_progress_bars()
    validate_jsonl(path, need_trg=False)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.Dataset.from_dict({"src": [r["src"] for r in rows], "trg": [r.get("trg", "") if isinstance(r.get("trg"), str) else "" for r in rows]})
