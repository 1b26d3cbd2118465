"""Packing (src, trg) pairs into fixed-length sequences (PAPER.md §1).

A sequence is `[CLS] src [SEP] trg [SEP]` padded with [PAD] to `seq_len`; `target_mask` is True
on everything after the first [SEP] (padding included: the model generates the padding, which is
how it chooses the output length). Too-long pairs lose tokens from the longer side first, and are
counted; `choose_seq_len` picks a length from a training split that cuts nothing (the model config's
`seq_len = 0`). Tokenisation runs once per split through `datasets.map` (cached on disk for file-backed
splits); the packed split lives in memory as two tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .tokenizer import Vocab


@dataclass
class Packed:
    ids: torch.Tensor  # (N, L) long
    target_mask: torch.Tensor  # (N, L) bool
    truncated: int  # how many pairs lost tokens

    def __len__(self) -> int:
        return self.ids.shape[0]


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


def pack_one(src: list[int], trg: list[int] | None, seq_len: int, vocab: Vocab) -> tuple[list[int], int, bool]:
    """One packed sequence (unpadded), the index of the first [SEP], and whether it was truncated.

    With trg None (decoding new inputs) the source is truncated as if the target were as long as
    the source, so the generated side keeps at least half of a full sequence.
    """
    if trg is None:
        n_src, _ = truncate_lengths(len(src), len(src), seq_len - 3)
        return [vocab.cls, *src[:n_src], vocab.sep], n_src + 1, n_src != len(src)
    n_src, n_trg = truncate_lengths(len(src), len(trg), seq_len - 3)
    seq = [vocab.cls, *src[:n_src], vocab.sep, *trg[:n_trg], vocab.sep]
    return seq, n_src + 1, (n_src, n_trg) != (len(src), len(trg))


def choose_seq_len(dataset, vocab: Vocab, multiple: int = 8) -> int:
    """The shortest length, a multiple of `multiple`, that holds every pair of the split whole
    (|src| + |trg| + 3) and that decodes every source whole (`pack_one` without a target keeps at most
    (seq_len − 3) // 2 source tokens, so 2·|src| + 3)."""
    src, trg = vocab.encode(list(dataset["src"])), vocab.encode(list(dataset["trg"]))
    need = max([max(len(s) + len(t) + 3, 2 * len(s) + 3) for s, t in zip(src, trg)], default=8)
    return max(8, -(-need // multiple) * multiple)


def pack_split(dataset, vocab: Vocab, seq_len: int, with_target: bool = True) -> Packed:
    """Tokenise a Dataset with columns src/trg and pack it; with_target=False leaves the target side empty."""

    def tokenize(batch):
        return {"src_ids": vocab.encode(batch["src"]), "trg_ids": vocab.encode(batch["trg"])}

    tokenized = dataset.map(tokenize, batched=True, batch_size=2048, remove_columns=dataset.column_names)
    n = len(tokenized)
    ids = torch.full((n, seq_len), vocab.pad, dtype=torch.long)
    target_mask = torch.zeros((n, seq_len), dtype=torch.bool)
    truncated = 0
    for i, (src, trg) in enumerate(zip(tokenized["src_ids"], tokenized["trg_ids"])):
        seq, sep, cut = pack_one(src, trg if with_target else None, seq_len, vocab)
        ids[i, : len(seq)] = torch.tensor(seq)
        target_mask[i, sep + 1 :] = True
        truncated += cut
    return Packed(ids, target_mask, truncated)
