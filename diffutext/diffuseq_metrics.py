"""DiffuSeq's `scripts/eval_seq2seq.py`, reproduced: the numbers its tables print (method.md §5). Depends on
nothing of ours.

The script (Shark-NLP/DiffuSeq) scores decoded files of `{"recover", "reference", "source"}` lines, one
file per decoding seed. Its definitions differ from the textbook ones in `metrics.py`, and every
difference is kept here; every key says `diffuseq_`, so the two sets are never mixed:

- text: each field is stripped, then the strings [SEP] and [CLS] are removed (and [PAD] from the
  output), so a cleaned output usually starts and ends with a space;
- `diffuseq_bleu`: nltk sentence BLEU-4, smoothing method4, whitespace tokens, one reference, averaged.
  Its argument order depends on the script's version (`SCRIPTS`): since 2023-02-14 (the version on
  both DiffuSeq branches, and the order that runs in the paper's fork, whose second `get_bleu`
  replaces the first) the reference is in the reference slot; the first release (2022-11-21) passed
  the output as the reference and the reference as the hypothesis;
- `diffuseq_rouge_l`: ROUGE-L F as torchmetrics' `ROUGEScore` computes it there (lower-cased, every run of
  characters outside [a-z0-9] a separator, F = 2PR/(P+R) over the longest common subsequence), each
  sentence's value rounded to float32 as the tensor it came in, then averaged;
- `diffuseq_dist_1`: distinct unigrams over unigrams per sentence (0 for an empty one), averaged;
- `diffuseq_avg_len`: `len(recover.split(' '))`, which counts the empty strings around a cleaned output;
- MBR (`select_best`): the candidate with the largest sum of get_bleu(candidate, other), the first on
  ties; with the 2022 order that sum is over the others scored against the candidate;
- self-BLEU (`diversity_of_set`): the mean of get_bleu(c_i, c_j) over pairs i < j (one direction), 0 for a
  single candidate; div-4: distinct 4-grams over all 4-grams of the set.
"""

from __future__ import annotations

import re
import statistics
import struct
from collections.abc import Sequence
from functools import lru_cache

SCRIPTS = ("2023", "2022")  # eval_seq2seq.py since 2023-02-14 (reference in the reference slot) | its 2022-11-21 release
SOS, EOS, SEP, PAD = "[CLS]", "[SEP]", "[SEP]", "[PAD]"  # the script's --sos, --eos, --sep, --pad defaults


def clean_recover(text: str) -> str:
    return text.strip().replace(EOS, "").replace(SOS, "").replace(SEP, "").replace(PAD, "")


def clean_reference(text: str) -> str:
    return text.strip().replace(EOS, "").replace(SOS, "").replace(SEP, "")


@lru_cache(maxsize=1)
def _smoothing():
    from nltk.translate.bleu_score import SmoothingFunction

    return SmoothingFunction().method4


def get_bleu(recover: str, reference: str, script: str = "2023") -> float:
    """The script's get_bleu: nltk sentence BLEU-4, method4, whitespace tokens, in the version's argument order."""
    from nltk.translate.bleu_score import sentence_bleu

    if script not in SCRIPTS:
        raise ValueError(f"unknown eval_seq2seq.py version {script!r}; expected one of {', '.join(SCRIPTS)}")
    hyp, ref = (recover, reference) if script == "2023" else (reference, recover)
    return float(sentence_bleu([ref.split()], hyp.split(), smoothing_function=_smoothing()))


def _float32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def _rouge_tokens(text: str) -> list[str]:
    return [t for t in re.split(r"\s+", re.sub(r"[^a-z0-9]+", " ", text.lower())) if t]


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, one row of the table at a time."""
    prev = [0] * (len(a) + 1)
    for y in b:
        row = [0]
        for j, x in enumerate(a):
            row.append(prev[j] + 1 if x == y else max(prev[j + 1], row[j]))
        prev = row
    return prev[-1]


def rouge_l(recover: str, reference: str) -> float:
    """ROUGE-L F of one sentence as torchmetrics' ROUGEScore()(recover, reference)['rougeL_fmeasure'].tolist()."""
    pred, target = _rouge_tokens(recover), _rouge_tokens(reference)
    if not pred or not target:
        return 0.0
    lcs = _lcs(pred, target)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(pred), lcs / len(target)
    return _float32(2 * p * r / (p + r))


def dist_1(recover: str) -> float:
    words = recover.split()
    return len(set(words)) / len(words) if words else 0.0


def length(recover: str) -> int:
    return len(recover.split(" "))


def select_best(candidates: Sequence[str], script: str = "2023") -> int:
    """The script's selectBest (MBR): index of the largest row sum of get_bleu(c_i, c_j), j ≠ i; the first on ties."""
    sums = [sum(get_bleu(a, b, script) for j, b in enumerate(candidates) if j != i) for i, a in enumerate(candidates)]
    return max(range(len(candidates)), key=lambda i: (sums[i], -i))


def div_4(candidates: Sequence[str]) -> float:
    grams = [tuple(w[i : i + 4]) for c in candidates for w in [c.split()] for i in range(len(w) - 3)]
    return len(set(grams)) / len(grams) if grams else 0.0


def diversity_of_set(candidates: Sequence[str], script: str = "2023") -> tuple[float, float]:
    """The script's diversityOfSet: (mean get_bleu(c_i, c_j) over i < j, or 0 for one candidate; div-4)."""
    pairs = [get_bleu(candidates[i], candidates[j], script) for i in range(len(candidates)) for j in range(i + 1, len(candidates))]
    return (statistics.fmean(pairs) if pairs else 0.0), div_4(candidates)


def score(recovers: Sequence[str], references: Sequence[str], script: str = "2023") -> dict[str, float]:
    """The script's per-file averages over cleaned (recover, reference) pairs (clean them first)."""
    if len(recovers) != len(references):
        raise ValueError(f"{len(recovers)} outputs but {len(references)} references")
    n = len(recovers)
    mean = (lambda xs: statistics.fmean(xs)) if n else (lambda xs: 0.0)
    return {
        "diffuseq_bleu": mean([get_bleu(h, r, script) for h, r in zip(recovers, references)]),
        "diffuseq_rouge_l": mean([rouge_l(h, r) for h, r in zip(recovers, references)]),
        "diffuseq_dist_1": mean([dist_1(h) for h in recovers]),
        "diffuseq_avg_len": mean([length(h) for h in recovers]),
        "diffuseq_count": n,
    }


def diversity(candidates: Sequence[Sequence[str]], script: str = "2023") -> dict[str, float]:
    """The script's diversity over seeds: self-BLEU and div-4 per source, averaged over sources."""
    sets = [diversity_of_set(c, script) for c in candidates if len(c)]
    return {
        "diffuseq_self_bleu": statistics.fmean(s for s, _ in sets) if sets else 0.0,
        "diffuseq_div_4": statistics.fmean(d for _, d in sets) if sets else 0.0,
    }


def mbr(candidates: Sequence[Sequence[str]], references: Sequence[str], script: str = "2023") -> dict[str, float]:
    """The script's --mbr branch: per source the select_best pick of its candidates, scored against the reference."""
    picks = [c[select_best(c, script)] for c in candidates]
    return score(picks, references, script)
