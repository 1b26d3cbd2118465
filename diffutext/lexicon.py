"""The copy prior's lexicon: which target token each source token is copied as.

Phrase-table lookup (Guo et al. 2019, "Non-Autoregressive Neural Machine Translation with Enhanced
Decoder Input") gives the decoder the source translated word by word instead of the source itself.
Here the table comes from the training split alone, at the copy prior's own alignment (target token
k against source token k): lex(s) is the target token most often aligned with s, kept when s is
aligned at least LEXICON_MIN_COUNT times and that token's share of them reaches the configured
share; every other token, and every special token, is copied as itself. Counting is one pass of
tensor arithmetic over the packed split (no loop over rows or tokens).
"""

from __future__ import annotations

import itertools

import torch

from .model import Denoiser

LEXICON_MIN_COUNT = 30  # alignments of a source token below which it is copied as itself


def aligned_pairs(ids: torch.Tensor, target_mask: torch.Tensor, specials: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(source token, target token) at the copy prior's alignment, both real tokens: for target token k, source
    token k, while both sides last. ids, target_mask: (N, L) of `[CLS] src [SEP] trg [SEP]` rows -> two (M,) tensors."""
    src = Denoiser.copied_source(ids.unsqueeze(-1), target_mask).squeeze(-1)  # what the prior copies there ([SEP] past the end)
    special = torch.tensor(specials)
    keep = target_mask & ~torch.isin(ids, special) & ~torch.isin(src, special)
    return src[keep], ids[keep]


def build_lexicon(ids: torch.Tensor, target_mask: torch.Tensor, vocab_size: int, share: float, specials: list[int],
                  min_count: int = LEXICON_MIN_COUNT) -> torch.Tensor:
    """lex: (vocab_size,) long, lex[s] = the target token most often aligned with s (the smallest id among ties)
    when s has at least `min_count` alignments and that token at least `share` of them, else s."""
    src, trg = aligned_pairs(ids, target_mask, specials)
    lex = torch.arange(vocab_size)
    if src.numel() == 0:
        return lex
    pairs, counts = torch.unique(src * vocab_size + trg, return_counts=True)  # sorted by (s, t)
    s, t = pairs // vocab_size, pairs % vocab_size
    total = torch.zeros(vocab_size, dtype=torch.long).index_add_(0, s, counts)
    best = torch.zeros(vocab_size, dtype=torch.long).scatter_reduce_(0, s, counts, "amax")
    winner = counts == best[s]
    first = torch.full((vocab_size,), vocab_size, dtype=torch.long).scatter_reduce_(0, s[winner], t[winner], "amin")
    ok = (total >= min_count) & (best >= share * total) & (first < vocab_size)
    lex[ok] = first[ok]
    return lex


def translate(sources: list[str], vocab, lex: torch.Tensor) -> list[str]:
    """Each source written token by token through the lexicon: what the copy prior alone (a silent network) writes."""
    pieces = vocab.encode(sources)
    flat = lex.cpu()[torch.tensor(list(itertools.chain.from_iterable(pieces)), dtype=torch.long)]
    return vocab.decode([ids.tolist() for ids in flat.split([len(p) for p in pieces])])
