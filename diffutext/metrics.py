"""Text-generation metrics (method.md §5). Depends on nothing of ours.

- `corpus_bleu`: sacreBLEU corpus BLEU, 0–100, with its signature (what MT/simplification users expect).
- `sentence_bleu`: the textbook sentence BLEU: nltk sentence BLEU-4, smoothing method4, whitespace
  tokens, every reference, averaged, 0–1. DiffuSeq's own script differs in places (its argument order
  in one version, one reference, its cleaning): that set is `diffuseq_metrics.py`.
- `rouge_l`: ROUGE-L F (rouge-score), averaged; with several references the best one counts.
- `dist_1`: distinct unigrams over all unigrams of the corpus (DiffuSeq's inter-sentence dist-1).
- `mbr_pick`, `self_bleu`, `div_4`: over the K candidates decoded for one source.
- `bertscore`: BERTScore F1 with a local model folder (optional extra `diffutext[bertscore]`),
  offline, labelled with its model and layer.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from functools import lru_cache

Refs = Sequence[Sequence[str]]  # per hypothesis, one or more references


class MetricError(ValueError):
    """A metric that cannot be computed as asked (missing optional package or model); one clear line."""


@lru_cache(maxsize=1)
def _smoothing():
    from nltk.translate.bleu_score import SmoothingFunction

    return SmoothingFunction().method4


def _nltk_bleu(refs: Sequence[Sequence[str]], hyp: Sequence[str]) -> float:
    from nltk.translate.bleu_score import sentence_bleu as nltk_sentence_bleu

    if not hyp:
        return 0.0
    return float(nltk_sentence_bleu([list(r) for r in refs], list(hyp), smoothing_function=_smoothing()))


def corpus_bleu(hyps: Sequence[str], refs: Refs) -> tuple[float, str]:
    """sacreBLEU corpus BLEU (0–100) and its signature; refs[i] lists the references of hyps[i]."""
    import sacrebleu

    n_refs = max(len(r) for r in refs)
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(n_refs)]
    bleu = sacrebleu.metrics.BLEU()
    score = bleu.corpus_score(list(hyps), streams)
    return float(score.score), str(bleu.get_signature())


def sentence_bleu(hyps: Sequence[str], refs: Refs) -> float:
    """Textbook sentence BLEU-4 (nltk, smoothing method4, whitespace tokens, every reference), averaged, 0–1."""
    if not hyps:
        return 0.0
    return statistics.fmean(_nltk_bleu([r.split() for r in rs], h.split()) for h, rs in zip(hyps, refs))


def rouge_l(hyps: Sequence[str], refs: Refs) -> float:
    """ROUGE-L F1 averaged over hypotheses, best reference each, 0–1."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    if not hyps:
        return 0.0
    return statistics.fmean(max(scorer.score(r, h)["rougeL"].fmeasure for r in rs) for h, rs in zip(hyps, refs))


def dist_n(hyps: Sequence[str], n: int = 1) -> float:
    """Distinct n-grams over all n-grams of the corpus (inter-sentence)."""
    grams = [tuple(w[i : i + n]) for h in hyps for w in [h.split()] for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def average_length(hyps: Sequence[str]) -> float:
    return statistics.fmean(len(h.split()) for h in hyps) if hyps else 0.0


def pairwise_bleu(candidates: Sequence[str]) -> list[list[float]]:
    """m[i][j] = sentence BLEU of candidate i against candidate j as the reference (diagonal 0)."""
    toks = [c.split() for c in candidates]
    return [[0.0 if i == j else _nltk_bleu([toks[j]], toks[i]) for j in range(len(toks))] for i in range(len(toks))]


def mbr_pick(candidates: Sequence[str], matrix: list[list[float]] | None = None) -> int:
    """Minimum Bayes risk: the candidate with the highest summed BLEU against the others."""
    m = matrix if matrix is not None else pairwise_bleu(candidates)
    sums = [sum(row) for row in m]
    return max(range(len(candidates)), key=lambda i: (sums[i], -i))


def self_bleu(matrix: list[list[float]]) -> float:
    """Mean BLEU of each candidate against each other one (lower = more diverse), 0–1."""
    k = len(matrix)
    if k < 2:
        return 0.0
    return sum(map(sum, matrix)) / (k * (k - 1))


def div_4(candidates: Sequence[str]) -> float:
    """Distinct 4-grams over all 4-grams of one source's candidates (higher = more diverse)."""
    return dist_n(candidates, 4)


def score(hyps: Sequence[str], refs: Refs) -> dict[str, float | str]:
    """The standard metrics (sacreBLEU, textbook sentence BLEU, ROUGE-L, dist-1, length), each named by what it is."""
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} reference sets")
    sacre, signature = corpus_bleu(hyps, refs) if hyps else (0.0, "")
    return {
        "sacrebleu": sacre,
        "sentence_bleu": sentence_bleu(hyps, refs),
        "rouge_l": rouge_l(hyps, refs),
        "dist_1": dist_n(hyps, 1),
        "avg_len": average_length(hyps),
        "count": len(hyps),
        "sacrebleu_signature": signature,
    }


def bertscore(hyps: Sequence[str], refs: Refs, model_dir, num_layers: int | None = None, batch_size: int = 32) -> tuple[float, str]:
    """Mean BERTScore F1 (best reference each) with a local model folder, and a label naming model and layer.

    Offline only: the folder must hold a Hugging Face model (config.json and weights). The layer is
    bert-score's own choice when the folder is named like a model it knows (e.g.
    deberta-xlarge-mnli, DiffuSeq's choice), else the model's last layer.
    """
    import json
    import os
    from pathlib import Path

    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise MetricError(f"--bertscore-model {folder}: not a local model folder (expected config.json and weights in it)")
    try:
        layers = int(json.loads((folder / "config.json").read_text(encoding="utf-8")).get("num_hidden_layers", 0))
    except (ValueError, UnicodeDecodeError, AttributeError):
        raise MetricError(f"{folder / 'config.json'}: not a valid model config") from None
    os.environ["HF_HUB_OFFLINE"] = "1"  # a local folder only: never reach for the network
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        import bert_score
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise MetricError("BERTScore needs the optional extra: pip install 'diffutext[bertscore]'") from None
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if num_layers is None:
        num_layers = bert_score.utils.model2layers.get(folder.name) or layers
    if not num_layers:
        raise MetricError(f"{folder / 'config.json'}: no num_hidden_layers; cannot choose a BERTScore layer")
    if not hyps:
        return 0.0, f"{folder.name}, layer {num_layers}"
    try:
        _, _, f1 = bert_score.score(
            list(hyps),
            [list(r) for r in refs],
            model_type=str(folder),
            num_layers=num_layers,
            batch_size=batch_size,
            lang=None,
            verbose=False,
        )
    except Exception as e:  # a broken model folder fails deep inside transformers: report it in one line
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise MetricError(f"--bertscore-model {folder}: could not score with it ({type(e).__name__}: {first})") from None
    return float(f1.mean()), f"{folder.name}, layer {num_layers}"
