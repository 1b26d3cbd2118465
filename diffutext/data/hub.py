"""The paper's tasks on the Hugging Face hub, and each one's conversion to (src, references).

A `HubSource` names a hub dataset stored as Parquet (so it loads with `datasets` >= 4, which runs
no loading scripts), the hub split behind each of our splits, and a conversion from the hub's own
columns. The schema each conversion assumes is written beside it; the tests feed every
conversion a small local Parquet file in that schema, so no test needs the network. These sets
are not DiffuSeq's exact splits (those live in DiffuSeq's release folders, which `--data-dir`
loads as they are); each conversion says how it differs.

The hub comes after the local folder, and only when it answers: with HF_HUB_OFFLINE or
HF_DATASETS_OFFLINE set only the local Hugging Face cache is consulted, and otherwise a
3-second connection test runs first, so an offline machine gets its one-line answer in seconds
rather than after minutes of retries.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from .jsonl import MissingSplit, Rows, TaskError


@dataclass(frozen=True)
class HubSource:
    path: str  # the hub dataset id
    config: str | None  # its configuration (subset)
    splits: dict[str, str]  # our split -> the hub split it comes from
    convert: Callable[[Any, str], Rows]  # (hub Dataset, our split) -> Rows
    schema: str  # the hub columns the conversion reads (for error messages)
    revision: str | None = None
    data_dir: str | None = None


def _usable(text) -> bool:
    return isinstance(text, str) and bool(text.strip())


def _add(rows: Rows, src, candidates) -> None:
    """Append one example; rows with an empty source or no usable reference are skipped."""
    if not _usable(src):
        return
    refs: list[str] = []
    for r in candidates:
        if _usable(r) and r not in refs:
            refs.append(r)
    if refs:
        rows.src.append(src)
        rows.refs.append(refs)


# ---- wiki-auto: GEM/wiki_auto_asset_turk (config wiki_auto_asset_turk) ----
# Assumed schema (the dataset card's dataset_info): gem_id: string, gem_parent_id: string,
# source: string, target: string, references: list<string>; splits train (483,801 pairs),
# validation (20,000), test_asset (359 sources × 10 references), test_turk, test_wiki, ...
# Our test split is ASSET: its `references` become the references. DiffuSeq's own Wiki-Auto
# release (677k pairs) is a different cut of the same corpus.


def convert_wiki_auto(ds, split: str) -> Rows:
    rows = Rows()
    for source, target, references in zip(ds["source"], ds["target"], ds["references"]):
        candidates = [target] + (list(references or []) if split == "test" else [])
        _add(rows, source, candidates)
    return rows


# ---- qqp: nyu-mll/glue (config qqp) ----
# Assumed schema: question1: string, question2: string, label: class_label (0 not duplicate,
# 1 duplicate; -1 on the unlabelled GLUE test split), idx: int32. Only duplicate pairs are
# paraphrases: label == 1 is kept. GLUE's test labels are hidden, so our valid and test splits
# are the even and odd `idx` halves of GLUE's validation split. DiffuSeq's QQP (144k train,
# 2,048 valid, 2,500 test) is another sample of the same duplicates.


def convert_qqp(ds, split: str) -> Rows:
    rows = Rows()
    half = {"valid": 0, "test": 1}.get(split)
    for q1, q2, label, idx in zip(ds["question1"], ds["question2"], ds["label"], ds["idx"]):
        if label != 1 or (half is not None and idx % 2 != half):
            continue
        _add(rows, q1, [q2])
    return rows


# ---- iwslt14: bbaaaa/iwslt14-de-en, its Parquet export (revision refs/convert/parquet, de-en/) ----
# Assumed schema: translation: struct<de: string, en: string> (the `translation` feature of the
# hub's translation sets); splits train (~160k), validation (~7.3k), test (~6.8k). Raw, cased
# text; DiffuSeq-v2's copy is lowercased and Moses-tokenised.


def convert_iwslt14(ds, split: str) -> Rows:
    rows = Rows()
    for pair in ds["translation"]:
        _add(rows, pair["de"], [pair["en"]])
    return rows


HUB: dict[str, HubSource] = {
    "wiki-auto": HubSource(
        "GEM/wiki_auto_asset_turk",
        "wiki_auto_asset_turk",
        {"train": "train", "valid": "validation", "test": "test_asset"},
        convert_wiki_auto,
        "source, target, references",
    ),
    "qqp": HubSource(
        "nyu-mll/glue",
        "qqp",
        {"train": "train", "valid": "validation", "test": "validation"},
        convert_qqp,
        "question1, question2, label, idx",
    ),
    "iwslt14": HubSource(
        "bbaaaa/iwslt14-de-en",
        None,
        {"train": "train", "valid": "validation", "test": "test"},
        convert_iwslt14,
        "translation {de, en}",
        revision="refs/convert/parquet",
        data_dir="de-en",
    ),
}


def _env_offline() -> str | None:
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return var
    return None


def _reachable(timeout: float = 3.0) -> str | None:
    """None when the hub's host answers a TCP connection; else why not."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"{host}: {e.strerror or type(e).__name__}"
    return None


def availability() -> tuple[bool, str]:
    """(worth calling load_dataset, why not / what to expect)."""
    var = _env_offline()
    if var:
        return True, f"{var} is set, so only the local Hugging Face cache is read"
    reason = _reachable()
    return (reason is None), (reason or "")


def _load_dataset(source: HubSource, hub_split: str):
    """datasets.load_dataset for one hub split (the tests replace this with a local Parquet file)."""
    import datasets

    datasets.disable_progress_bars()
    return datasets.load_dataset(source.path, source.config, split=hub_split, revision=source.revision, data_dir=source.data_dir)


def load(source: HubSource, split: str) -> Rows:
    """One of our splits from the hub, converted to Rows."""
    hub_split = source.splits.get(split)
    if hub_split is None:
        raise MissingSplit(f"hub dataset {source.path} has no split for {split!r}")
    try:
        ds = _load_dataset(source, hub_split)
    except Exception as e:  # network, cache miss, missing split: all mean "could not load it"
        first = (str(e).strip().splitlines() or [""])[0][:160]
        offline = _env_offline()
        why = f" ({offline} is set and it is not in the local cache)" if offline else ""
        raise TaskError(f"hub dataset {source.path} split {hub_split!r} could not be loaded{why}: {type(e).__name__}: {first}") from None
    try:
        rows = source.convert(ds, split)
    except (KeyError, TypeError, ValueError) as e:
        columns = ", ".join(getattr(ds, "column_names", []) or [])
        raise TaskError(
            f"hub dataset {source.path} split {hub_split!r} has columns [{columns}], expected {source.schema} ({type(e).__name__}: {e})"
        ) from None
    if not rows.src:
        raise TaskError(f"hub dataset {source.path} split {hub_split!r} gave no usable (src, trg) pairs")
    return rows
