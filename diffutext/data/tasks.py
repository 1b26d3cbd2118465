"""Tasks: where (src, trg) pairs come from.

`--task` is one of:
- an embedded task: `bible-basic` (King James → Bible in Basic English, a simplification) or
  `bible-modern` (King James → World English Bible, a modernisation), public-domain verses of at
  most 20 words shipped inside the package;
- a task of the paper or of DiffuSeq: `wiki-auto`, `qqp`, `quasar-t`, `roc`, `ccd`, `iwslt14`.
  It resolves, in order, to a DiffuSeq folder under `--data-dir` or $DIFFUTEXT_DATA (our name or
  DiffuSeq's own folder name: QQP, Quasar-T, CommonsenseConversation, ROCstory, ...), then to its
  Hugging Face hub dataset where one exists (`hub.py`); with neither, one line says what was tried
  and how to supply the data;
- any folder in DiffuSeq's format: `train.jsonl`, `valid.jsonl`, `test.jsonl` (also
  `<split>.pairs.jsonl`), one `{"src": ..., "trg": ...}` per line, and optionally
  `<split>.multiref.jsonl` with `{"src": ..., "refs": [...]}` lines for evaluation.

Two shapes come out, both `datasets.Dataset`s: `load_split` gives training pairs (columns src,
trg; a multi-reference file gives one pair per reference) and `load_eval_split` gives sources
with all their references (columns src, trg = the first reference, refs). A folder's files are
read by `store.py` (Arrow, memory-mapped from the datasets cache when large); the embedded and
hub tasks are built in memory.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..config import Split, choices
from . import hub, store
from .jsonl import MissingSplit, Rows, TaskError, read_jsonl  # noqa: F401  (the errors are part of this module's API)

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

SPLITS = choices(Split)
DATA_ENV = "DIFFUTEXT_DATA"


@dataclass(frozen=True)
class EmbeddedTask:
    name: str
    target_column: str  # column of the embedded TSV that holds the target text
    description: str


EMBEDDED = {
    "bible-basic": EmbeddedTask("bible-basic", "BBE", "King James → Bible in Basic English (simplification)"),
    "bible-modern": EmbeddedTask("bible-modern", "WEB", "King James → World English Bible (modernisation)"),
}


@dataclass(frozen=True)
class PaperTask:
    name: str
    description: str
    folders: tuple[str, ...]  # folder names accepted under the data folder (compared without case, '-' or '_')


PAPER_TASKS = {
    "wiki-auto": PaperTask("wiki-auto", "Wiki-Auto text simplification", ("wiki-auto", "WA", "wiki_auto", "wikiauto")),
    "qqp": PaperTask("qqp", "Quora Question Pairs paraphrase", ("QQP",)),
    "quasar-t": PaperTask("quasar-t", "Quasar-T question generation", ("Quasar-T", "quasar_t")),
    "roc": PaperTask("roc", "ROCStories story generation", ("ROCstory", "roc", "ROCStories", "roc_story")),
    "ccd": PaperTask("ccd", "Commonsense Conversation dialogue", ("CommonsenseConversation", "ccd")),
    "iwslt14": PaperTask("iwslt14", "IWSLT14 German → English translation", ("iwslt14", "iwslt14-de-en")),
}


def task_names() -> list[str]:
    return [*EMBEDDED, *PAPER_TASKS]


# ---- the embedded tasks ----


def _embedded_rows() -> list[list[str]]:
    raw = resources.files("diffutext.resources").joinpath("bible_short_verses.tsv.gz").read_bytes()
    text = gzip.decompress(raw).decode("utf-8")
    # The verses contain quote characters: read with quoting off so no quote ever spans lines.
    return list(csv.reader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE))


def embedded_pairs(task: str, split: str) -> list[dict[str, str]]:
    spec = EMBEDDED[task]
    rows = _embedded_rows()
    header, body = rows[0], rows[1:]
    i_split, i_src, i_trg = header.index("split"), header.index("KJV"), header.index(spec.target_column)
    return [{"src": r[i_src], "trg": r[i_trg]} for r in body if r[i_split] == split]


# ---- resolving a task to a source ----


@dataclass(frozen=True)
class Source:
    task: str
    kind: str  # "embedded" | "folder" | "hub"
    folder: Path | None = None
    hub: hub.HubSource | None = None

    def describe(self) -> str:
        if self.kind == "folder":
            return self.task if str(self.folder) == self.task else f"{self.task} from {self.folder}"
        if self.kind == "hub":
            return f"{self.task} from the Hugging Face hub ({self.hub.path})"
        return f"{self.task} (embedded)"


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def is_folder_task(task: str) -> bool:
    return task not in EMBEDDED and task not in PAPER_TASKS and ("/" in task or os.sep in task or Path(task).is_dir())


def data_dirs(data_dir: str | Path | None = None) -> list[tuple[Path, str]]:
    """The folders searched for a paper task's DiffuSeq folder, in order, each with where it came from."""
    dirs = []
    if data_dir:
        dirs.append((Path(data_dir), "--data-dir"))
    env = os.environ.get(DATA_ENV, "").strip()
    if env:
        dirs.append((Path(env), f"${DATA_ENV}"))
    return dirs


def _find_folder(spec: PaperTask, root: Path) -> Path | None:
    wanted = [_norm(n) for n in (spec.name, *spec.folders)]
    try:
        entries = [p for p in root.iterdir() if p.is_dir()]
    except OSError:
        return None
    matches = [p for p in entries if _norm(p.name) in wanted]
    if not matches:
        return None
    return min(matches, key=lambda p: (wanted.index(_norm(p.name)), p.name))


def supply_hint(spec: PaperTask) -> str:
    return (
        f"supply it with --data-dir DIR (or {DATA_ENV}=DIR) where DIR/{spec.folders[0]}/ holds train.jsonl, valid.jsonl "
        f'and test.jsonl, one {{"src": ..., "trg": ...}} per line'
    )


def resolve(task: str, data_dir: str | Path | None = None) -> Source:
    """Where a task's data comes from; TaskError (one line) when nowhere."""
    if task in EMBEDDED:
        return Source(task, "embedded")
    if task in PAPER_TASKS:
        spec = PAPER_TASKS[task]
        tried = []
        dirs = data_dirs(data_dir)
        for root, label in dirs:
            if not root.is_dir():
                if label == "--data-dir":
                    raise TaskError(f"--data-dir {root} does not exist (expected a folder holding {spec.folders[0]}/train.jsonl ...)")
                tried.append(f"{label}={root} is not a folder")
                continue
            found = _find_folder(spec, root)
            if found is not None:
                return Source(task, "folder", folder=found)
            tried.append(f"no {' / '.join(dict.fromkeys([spec.name, *spec.folders]))} folder in {root}")
        if not dirs:
            tried.append(f"no --data-dir given and ${DATA_ENV} unset")
        source = hub.HUB.get(task)
        if source is None:
            tried.append("no Hugging Face hub dataset is wired for it")
        else:
            usable, why = hub.availability()
            if usable:
                return Source(task, "hub", hub=source)
            tried.append(f"hub dataset {source.path} unreachable ({why})")
        raise TaskError(f"task {task!r} ({spec.description}) has no data here: {'; '.join(tried)}; {supply_hint(spec)}")
    if is_folder_task(task):
        folder = Path(task)
        if not folder.exists():
            raise TaskError(f"task folder {folder} does not exist")
        if not folder.is_dir():
            raise TaskError(f"task {folder} is not a folder (expected a folder with DiffuSeq's train.jsonl, valid.jsonl, test.jsonl)")
        return Source(task, "folder", folder=folder)
    raise TaskError(f"unknown task {task!r}: give one of {', '.join(task_names())} or a folder with train.jsonl/valid.jsonl/test.jsonl")


def split_file(folder: Path, split: str, for_eval: bool = False, hint: str = "") -> Path:
    """The file behind one split of a DiffuSeq folder; evaluation prefers `<split>.multiref.jsonl`."""
    pairs = [folder / f"{split}.jsonl", folder / f"{split}.pairs.jsonl"]
    multiref = folder / f"{split}.multiref.jsonl"
    for path in [multiref, *pairs] if for_eval else [*pairs, multiref]:
        if path.is_file():
            return path
    found = sorted(p.name for p in folder.glob("*.jsonl"))
    listing = f"found {', '.join(found)}" if found else "no .jsonl files in it"
    raise MissingSplit(
        f"task folder {folder} has no {split}.jsonl ({listing}; expected DiffuSeq's train.jsonl, valid.jsonl, test.jsonl{hint})"
    )


TRAIN_HINT = "; train on another split with --train-split"
EVAL_HINT = "; decode another split with --split, or a file with --input FILE.jsonl"


def check_task(task: str, data_dir: str | Path | None = None, train_split: str = "train") -> Source:
    """Fail early, with one line, on a task that cannot be resolved or has no training split."""
    source = resolve(task, data_dir)
    if source.kind == "folder":
        split_file(source.folder, train_split, hint=TRAIN_HINT if train_split == "train" else "")
    return source


# ---- loading ----


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise TaskError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")


def _source(task: str, split: str, data_dir: str | Path | None) -> Source:
    _check_split(split)
    return resolve(task, data_dir)


def load_rows(task: str, split: str, data_dir: str | Path | None = None, for_eval: bool = False) -> Rows:
    """One split of a task as Rows (sources and their references), from wherever the task resolves."""
    source = _source(task, split, data_dir)
    if source.kind == "embedded":
        pairs = embedded_pairs(task, split)
        return Rows([p["src"] for p in pairs], [[p["trg"]] for p in pairs])
    if source.kind == "hub":
        try:
            return hub.load(source.hub, split)
        except TaskError as e:
            raise type(e)(f"task {task!r}: {e}; or {supply_hint(PAPER_TASKS[task])}") from None
    return read_jsonl(_split_path(source, split, for_eval))


def _split_path(source: Source, split: str, for_eval: bool) -> Path:
    hint = EVAL_HINT if for_eval else (TRAIN_HINT if split == "train" else "")
    return split_file(source.folder, split, for_eval=for_eval, hint=hint)


def pairs_dataset(rows: Rows):
    """Training form, in memory: columns src, trg, one row per (source, reference)."""
    return store.in_memory(store.rows_table(rows, "pairs"))


def eval_dataset(rows: Rows):
    """Evaluation form, in memory: columns src, trg (the first reference, "" when none) and refs (all of them)."""
    return store.in_memory(store.rows_table(rows, "eval"))


def load_split(task: str, split: str, data_dir: str | Path | None = None):
    """One split of a task as training pairs: a `datasets.Dataset` with columns src, trg.

    A folder's file is Arrow-backed (memory-mapped from the cache when large, `store.py`); the
    embedded and hub tasks are built in memory.
    """
    source = _source(task, split, data_dir)
    if source.kind == "folder":
        return store.load(_split_path(source, split, for_eval=False), "pairs")
    return pairs_dataset(load_rows(task, split, data_dir))


def load_eval_split(task: str, split: str, data_dir: str | Path | None = None):
    """One split of a task for decoding and scoring: columns src, trg, refs (every reference)."""
    source = _source(task, split, data_dir)
    if source.kind == "folder":
        return store.load(_split_path(source, split, for_eval=True), "eval")
    return eval_dataset(load_rows(task, split, data_dir, for_eval=True))


def read_inputs(path: Path):
    """A user's input file for `sample --input`: jsonl with src (trg or refs optional), in evaluation form."""
    return store.load(Path(path), "eval", need_target=False)


def references(dataset) -> list[list[str]]:
    """Per row of a Dataset, its references: the refs column when present, else [trg] (none when trg is empty)."""
    if "refs" in dataset.column_names:
        return [list(r) for r in dataset["refs"]]
    return [[t] if isinstance(t, str) and t.strip() else [] for t in dataset["trg"]]
