"""Packing (src, trg) pairs into fixed-length sequences (method.md §1).

A sequence is `[CLS] src [SEP] trg [SEP]` padded with [PAD] to `seq_len`; `target_mask` is True
on everything after the first [SEP] (padding included: the model generates the padding, which is
how it chooses the output length). Too-long pairs lose tokens from the longer side first, and are
counted; `choose_seq_len` picks a length from a training split that cuts nothing (the model config's
`seq_len = 0`).

`pack_split` tokenizes a split in chunks (`encode_batch`) and packs each chunk with array
arithmetic, no loop over rows or tokens. The result is two (N, L) matrices: the ids at 16 bits
(32 for vocabularies over 32,768) and the mask as bytes. For a split read from the cache
(`store.py`, a memory-mapped Arrow file) they are written once as `.npy` files beside it, keyed
by the split's fingerprint, the tokenizer's JSON and seq_len, and memory-mapped on every later
load, which tokenizes nothing. Rows come back as int64 ids and bool masks, as the model takes them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import store
from .tokenizer import Vocab

PACK_FORMAT = 1
CHUNK = 1 << 16  # rows tokenized and packed at a time


class CompactIds:
    """(N, L) token ids stored at 16 or 32 bits (memory-mapped when cached); indexing returns int64."""

    dtype = torch.long

    def __init__(self, data: torch.Tensor):
        self.data = data

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, index) -> torch.Tensor:
        return self.data[index].long()


@dataclass
class Packed:
    ids: CompactIds  # (N, L); ids[rows] is a long tensor
    target_mask: torch.Tensor  # (N, L) bool
    truncated: int  # how many pairs lost tokens

    def __len__(self) -> int:
        return len(self.ids)


def truncate_lengths(n_src: int, n_trg: int, budget: int) -> tuple[int, int]:
    """Lengths kept when src+trg exceed budget: drop from the longer side first (ties: both)."""
    if n_src + n_trg <= budget:
        return n_src, n_trg
    short, long_ = sorted((n_src, n_trg))
    if budget - short >= short:
        keep_short, keep_long = short, budget - short
    else:
        keep_short = keep_long = budget // 2
    return (keep_long, keep_short) if n_src > n_trg else (keep_short, keep_long)


def truncate_arrays(n_src: np.ndarray, n_trg: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """`truncate_lengths` over arrays of lengths."""
    short = np.minimum(n_src, n_trg)
    room = budget - short >= short
    keep_short = np.where(room, short, budget // 2)
    keep_long = np.where(room, budget - short, budget // 2)
    src_longer = n_src > n_trg
    fits = n_src + n_trg <= budget
    return (
        np.where(fits, n_src, np.where(src_longer, keep_long, keep_short)),
        np.where(fits, n_trg, np.where(src_longer, keep_short, keep_long)),
    )


def diffuseq_lists(
    src: list[list[int]], trg: list[list[int]] | None, seq_len: int, vocab: Vocab
) -> tuple[list[list[int]], list[list[int]] | None, list[bool]]:
    """DiffuSeq's layout `[CLS] src [SEP] [SEP] [CLS] trg [SEP]` (its text_datasets.merge_and_mask) as the inputs of
    ours: src + [SEP] and [CLS] + trg, truncated here as DiffuSeq truncates ([CLS] src and [CLS] trg, the longer
    side first, to seq_len − 3 together), so that our packer cuts nothing more. The target mask then starts at
    the target's [CLS], as DiffuSeq's does. Returns the new lists and, per row, whether it was truncated."""
    budget = seq_len - 3
    if trg is None:  # decoding: as if the target were as long as the source
        keep = [truncate_lengths(len(s) + 1, len(s) + 1, budget)[0] - 1 for s in src]
        return [s[:k] + [vocab.sep] for s, k in zip(src, keep)], None, [k != len(s) for s, k in zip(src, keep)]
    kept = [truncate_lengths(len(s) + 1, len(t) + 1, budget) for s, t in zip(src, trg)]
    new_src = [s[: a - 1] + [vocab.sep] for s, (a, _) in zip(src, kept)]
    new_trg = [[vocab.cls] + t[: b - 1] for t, (_, b) in zip(trg, kept)]
    return new_src, new_trg, [(a - 1, b - 1) != (len(s), len(t)) for s, t, (a, b) in zip(src, trg, kept)]


def pack_one(src: list[int], trg: list[int] | None, seq_len: int, vocab: Vocab, layout: str = "diffutext") -> tuple[list[int], int, bool]:
    """One packed sequence (unpadded), the index of the [SEP] that ends the source side, and whether it was truncated.

    With trg None (decoding new inputs) the source is truncated as if the target were as long as
    the source, so the generated side keeps at least half of a full sequence. `layout` "diffuseq": DiffuSeq's.
    """
    if layout == "diffuseq":
        new_src, new_trg, cut = diffuseq_lists([src], None if trg is None else [trg], seq_len, vocab)
        seq, sep, _ = pack_one(new_src[0], None if new_trg is None else new_trg[0], seq_len, vocab)
        return seq, sep, cut[0]
    if trg is None:
        n_src, _ = truncate_lengths(len(src), len(src), seq_len - 3)
        return [vocab.cls, *src[:n_src], vocab.sep], n_src + 1, n_src != len(src)
    n_src, n_trg = truncate_lengths(len(src), len(trg), seq_len - 3)
    seq = [vocab.cls, *src[:n_src], vocab.sep, *trg[:n_trg], vocab.sep]
    return seq, n_src + 1, (n_src, n_trg) != (len(src), len(trg))


def _flat(token_lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Ragged token lists as (all tokens, per-row lengths)."""
    lengths = np.fromiter(map(len, token_lists), np.int64, count=len(token_lists))
    return np.fromiter(itertools.chain.from_iterable(token_lists), np.int64, count=int(lengths.sum())), lengths


def _place(ids: np.ndarray, tokens: np.ndarray, lengths: np.ndarray, keep: np.ndarray, first_col) -> None:
    """Token j of row i goes to column first_col[i] + j, for j < keep[i]."""
    row = np.repeat(np.arange(len(lengths)), lengths)
    j = np.arange(len(tokens)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    kept = j < keep[row]
    col = j + (first_col[row] if isinstance(first_col, np.ndarray) else first_col)
    ids[row[kept], col[kept]] = tokens[kept]


def pack_arrays(
    src: list[list[int]],
    trg: list[list[int]] | None,
    seq_len: int,
    vocab: Vocab,
    ids_out: np.ndarray,
    mask_out: np.ndarray,
    layout: str = "diffutext",
) -> int:
    """Pack tokenized rows into ids_out / mask_out (each (n, seq_len)); return how many were truncated.

    Row for row the same as `pack_one` (trg None: the inference layout, an empty target side).
    """
    if layout == "diffuseq":
        src, trg, cut = diffuseq_lists(src, trg, seq_len, vocab)
        return pack_arrays(src, trg, seq_len, vocab, ids_out, mask_out) + sum(cut)
    n = len(src)
    src_tok, n_src = _flat(src)
    if trg is None:
        keep_src, _ = truncate_arrays(n_src, n_src, seq_len - 3)
        cut = keep_src != n_src
    else:
        trg_tok, n_trg = _flat(trg)
        keep_src, keep_trg = truncate_arrays(n_src, n_trg, seq_len - 3)
        cut = (keep_src != n_src) | (keep_trg != n_trg)
    rows = np.arange(n)
    ids = np.full((n, seq_len), vocab.pad, dtype=ids_out.dtype)
    ids[:, 0] = vocab.cls
    _place(ids, src_tok, n_src, keep_src, 1)
    ids[rows, keep_src + 1] = vocab.sep
    if trg is not None:
        _place(ids, trg_tok, n_trg, keep_trg, keep_src + 2)
        ids[rows, keep_src + keep_trg + 2] = vocab.sep
    ids_out[...] = ids
    mask_out[...] = np.arange(seq_len)[None, :] >= (keep_src + 2)[:, None]  # everything after the first [SEP]
    return int(cut.sum())


def id_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.int16 if vocab_size <= 1 << 15 else np.int32)


def _pack_key(dataset, vocab: Vocab, seq_len: int, with_target: bool, layout: str = "diffutext") -> str | None:
    """The cache key of a packed split, or None for a split that lives in memory (not cached)."""
    if not dataset.cache_files:
        return None
    tokenizer = hashlib.sha256(vocab.to_str().encode()).hexdigest()
    ident = [PACK_FORMAT, dataset._fingerprint, tokenizer, seq_len, with_target] + ([layout] if layout != "diffutext" else [])
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:32]


def _open_packed(folder: Path, n: int, seq_len: int) -> Packed | None:
    try:
        meta = json.loads((folder / "meta.json").read_text())
        ids = np.load(folder / "ids.npy", mmap_mode="c")  # copy-on-write: writable for torch, the file never changes
        mask = np.load(folder / "target_mask.npy", mmap_mode="c")
    except (OSError, ValueError):
        return None
    if ids.shape != (n, seq_len) or mask.shape != (n, seq_len) or mask.dtype != np.bool_:
        return None
    return Packed(CompactIds(torch.from_numpy(ids)), torch.from_numpy(mask), int(meta["truncated"]))


def _fill(dataset, vocab: Vocab, with_target: bool, ids: np.ndarray, mask: np.ndarray, layout: str = "diffutext") -> int:
    truncated = 0
    for start in range(0, len(dataset), CHUNK):
        batch = dataset[start : start + CHUNK]
        stop = start + len(batch["src"])
        trg = vocab.encode(batch["trg"]) if with_target else None
        truncated += pack_arrays(vocab.encode(batch["src"]), trg, ids.shape[1], vocab, ids[start:stop], mask[start:stop], layout)
    return truncated


def _pack_cached(dataset, vocab: Vocab, seq_len: int, with_target: bool, folder: Path, layout: str = "diffutext") -> Packed:
    """The packed split from its cache folder, packing it there first when absent (OSError: cannot)."""
    n = len(dataset)
    cached = _open_packed(folder, n, seq_len) if folder.is_dir() else None
    if cached is not None:
        return cached
    shutil.rmtree(folder, ignore_errors=True)  # a damaged entry
    tmp = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        ids = np.lib.format.open_memmap(tmp / "ids.npy", mode="w+", dtype=id_dtype(vocab.size), shape=(n, seq_len))
        mask = np.lib.format.open_memmap(tmp / "target_mask.npy", mode="w+", dtype=np.bool_, shape=(n, seq_len))
        truncated = _fill(dataset, vocab, with_target, ids, mask, layout)
        ids.flush()
        mask.flush()
        del ids, mask
        (tmp / "meta.json").write_text(
            json.dumps({"format": PACK_FORMAT, "rows": n, "seq_len": seq_len, "truncated": truncated, "with_target": with_target})
        )
        for name in ("ids.npy", "target_mask.npy", "meta.json"):
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        try:
            os.rename(tmp, folder)
        except OSError:  # another process (a DDP rank) packed it first: use theirs
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    packed = _open_packed(folder, n, seq_len)
    if packed is None:
        raise OSError(f"{folder}: the packed split cannot be read back")
    return packed


def choose_seq_len(dataset, vocab: Vocab, multiple: int = 8, chunk: int = 65_536) -> int:
    """The shortest length, a multiple of `multiple`, that holds every pair of the split whole
    (|src| + |trg| + 3) and that decodes every source whole (`pack_one` without a target keeps at most
    (seq_len − 3) // 2 source tokens, so 2·|src| + 3). Tokenizes the split once more, chunk by chunk."""
    need = 8
    for i in range(0, len(dataset), chunk):
        rows = dataset[i : i + chunk]
        n_src, n_trg = (np.fromiter(map(len, vocab.encode(rows[k])), np.int64) for k in ("src", "trg"))
        need = max(need, int(np.maximum(n_src + n_trg + 3, 2 * n_src + 3).max(initial=8)))
    return -(-need // multiple) * multiple


def pack_split(dataset, vocab: Vocab, seq_len: int, with_target: bool = True, layout: str = "diffutext") -> Packed:
    """Tokenise a Dataset with columns src/trg and pack it; with_target=False leaves the target side empty;
    `layout` "diffuseq": DiffuSeq's sequence layout (`diffuseq_lists`)."""
    key = _pack_key(dataset, vocab, seq_len, with_target, layout)
    if key is not None:
        try:
            return _pack_cached(dataset, vocab, seq_len, with_target, store.cache_dir() / f"packed-{key}", layout)
        except OSError:
            pass  # an unwritable cache folder: pack in memory
    ids = np.empty((len(dataset), seq_len), id_dtype(vocab.size))
    mask = np.empty((len(dataset), seq_len), np.bool_)
    truncated = _fill(dataset, vocab, with_target, ids, mask, layout)
    return Packed(CompactIds(torch.from_numpy(ids)), torch.from_numpy(mask), truncated)


def source_overlap(data: Packed, vocab: Vocab, rows: int = 10_000) -> float:
    """How much the targets of a packed split repeat their sources: the token Dice coefficient
    2·|src ∩ trg| / (|src| + |trg|) over the first `rows` pairs, with multiset intersections per pair and
    [CLS], [SEP] and [PAD] left out (1: every target is its source reordered; 0: no token shared)."""
    ids, mask = data.ids[:rows], data.target_mask[:rows]
    words = (ids != vocab.pad) & (ids != vocab.cls) & (ids != vocab.sep)
    key = torch.arange(ids.shape[0])[:, None] * (ids.max().item() + 1) + ids  # (row, token) as one number

    def counted(side: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.unique(key[side & words], return_counts=True)

    src_keys, src_counts = counted(~mask)
    trg_keys, trg_counts = counted(mask)
    total = int(src_counts.sum() + trg_counts.sum())
    if total == 0 or len(src_keys) == 0:
        return 0.0
    at = torch.searchsorted(src_keys, trg_keys).clamp(max=len(src_keys) - 1)
    shared = src_keys[at] == trg_keys
    common = torch.minimum(src_counts[at[shared]], trg_counts[shared]).sum()
    return 2 * int(common) / total


def held_end(ids: torch.Tensor, target_mask: torch.Tensor, pad: int) -> torch.Tensor:
    """The target's end as held positions (B, L) bool: its [SEP] (the last token that is not [PAD]) and the padding
    after it, which a model with a length head keeps clean and out of attention (`model.target_length` head)."""
    idx = torch.arange(ids.shape[1], device=ids.device)
    last = torch.where(ids != pad, idx, -1).amax(1, keepdim=True)  # the target's closing [SEP]
    return target_mask & (idx >= last)
