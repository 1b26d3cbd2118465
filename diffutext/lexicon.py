"""The copy prior's lexicon: which target token each source token is copied as.

Phrase-table lookup (Guo et al. 2019, "Non-Autoregressive Neural Machine Translation with Enhanced
Decoder Input") gives the decoder the source translated word by word instead of the source itself.
The table comes from the training split alone, in one of two ways (`model.lexicon_model`):
- "position": at the copy prior's own alignment (target token k against source token k), lex(s) is the
  target token most often aligned with s, kept when s is aligned at least LEXICON_MIN_COUNT times and
  that token's share of them reaches the configured share (`build_lexicon`);
- "ibm1": IBM Model 1's translation table t(e | f), learned by EM over the pairs whatever the positions,
  lex(s) = argmax_e t(e | s) where that probability reaches the share (`ibm1_lexicon`).
Every other token, and every special token, is copied as itself. Counting is tensor arithmetic over the
packed split (no loop over rows or tokens).
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


def build_lexicon(
    ids: torch.Tensor, target_mask: torch.Tensor, vocab_size: int, share: float, specials: list[int], min_count: int = LEXICON_MIN_COUNT
) -> torch.Tensor:
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


def _sides(ids: torch.Tensor, target_mask: torch.Tensor, specials: list[int]) -> tuple[torch.Tensor, ...]:
    """Each row's real source and target tokens, left-aligned: (S, S_ok, T, T_ok), (N, Ls) and (N, Lt)."""
    real = ~torch.isin(ids, torch.tensor(specials))

    def side(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = mask.sum(1)
        width = max(int(n.max()) if len(n) else 0, 1)
        order = torch.argsort((~mask).int(), dim=1, stable=True)[:, :width]  # the side's tokens first, in order
        return ids.gather(1, order), torch.arange(width)[None] < n[:, None]

    return (*side(~target_mask & real), *side(target_mask & real))


def ibm1_lexicon(
    ids: torch.Tensor,
    target_mask: torch.Tensor,
    vocab_size: int,
    share: float,
    specials: list[int],
    min_count: int = LEXICON_MIN_COUNT,
    iterations: int = 5,
    chunk: int = 4096,
) -> torch.Tensor:
    """lex from IBM Model 1 (Brown et al. 1993), the translation table fast_align and GIZA++ start from: t(e | f) by
    expectation–maximisation over the training pairs, every target token of a pair aligned to one of its source
    tokens or to none (a NULL source, [CLS] here), whatever their positions. lex[f] = argmax_e t(e | f) when f occurs
    at least `min_count` times and t reaches `share`, else f. The table is kept over the (f, e) pairs that co-occur
    in some training pair only (never V × V); each iteration is a few tensor operations per chunk of rows."""
    S, S_ok, T, T_ok = _sides(ids, target_mask, specials)
    null = specials[1] if len(specials) > 1 else specials[0]  # [CLS]: a source word no target token is
    S = torch.cat([torch.full((len(S), 1), null), S], 1)
    S_ok = torch.cat([torch.ones(len(S), 1, dtype=torch.bool), S_ok], 1)
    chunks = []
    for i in range(0, len(S), chunk):  # (rows, Lt, Ls) keys f·V + e and where both tokens are real
        keys = S[i : i + chunk, None, :] * vocab_size + T[i : i + chunk, :, None]
        chunks.append((keys, T_ok[i : i + chunk, :, None] & S_ok[i : i + chunk, None, :]))
    pairs = torch.unique(torch.cat([k[ok] for k, ok in chunks]))  # sorted (f, e) keys that co-occur
    lex = torch.arange(vocab_size)
    if pairs.numel() == 0:
        return lex
    f_of = pairs // vocab_size
    index = [torch.searchsorted(pairs, k).clamp(max=len(pairs) - 1) for k, _ in chunks]
    table = torch.ones(len(pairs))  # t(e | f), uniform: the first E step aligns each target token evenly
    for _ in range(iterations):
        counts = torch.zeros(len(pairs))
        for (_keys, ok), idx in zip(chunks, index):
            p = table[idx] * ok
            post = p / p.sum(-1, keepdim=True).clamp(min=1e-30)  # over the source tokens of each target token
            counts.index_add_(0, idx[ok], post[ok])
        total = torch.zeros(vocab_size).index_add_(0, f_of, counts)
        table = counts / total[f_of].clamp(min=1e-30)
    best = torch.zeros(vocab_size).scatter_reduce_(0, f_of, table, "amax")
    top = table == best[f_of]
    first = torch.full((vocab_size,), vocab_size, dtype=torch.long).scatter_reduce_(0, f_of[top], (pairs % vocab_size)[top], "amin")
    seen = torch.zeros(vocab_size, dtype=torch.long).index_add_(
        0, S[:, 1:][S_ok[:, 1:]], torch.ones(int(S_ok[:, 1:].sum()), dtype=torch.long)
    )
    ok = (seen >= min_count) & (best >= share) & (first < vocab_size)
    ok[torch.tensor(specials)] = False
    lex[ok] = first[ok]
    return lex


def translate(sources: list[str], vocab, lex: torch.Tensor) -> list[str]:
    """Each source written token by token through the lexicon: what the copy prior alone (a silent network) writes."""
    pieces = vocab.encode(sources)
    flat = lex.cpu()[torch.tensor(list(itertools.chain.from_iterable(pieces)), dtype=torch.long)]
    return vocab.decode([ids.tolist() for ids in flat.split([len(p) for p in pieces])])
