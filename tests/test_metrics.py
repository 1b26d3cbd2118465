"""Metrics against hand-computed values (method.md §5)."""

import pytest

from diffutext import metrics


def test_identical_output_scores_perfectly():
    hyps = ["the cat sat on the mat", "a dog ran in the park today"]
    s = metrics.score(hyps, [[h] for h in hyps])
    assert s["sacrebleu"] == pytest.approx(100.0)
    assert s["sentence_bleu"] == pytest.approx(1.0)
    assert s["rouge_l"] == pytest.approx(1.0)
    assert s["sacrebleu_signature"].startswith("nrefs:1|") and "|tok:13a|" in s["sacrebleu_signature"]  # sacreBLEU's default tokenizer


def test_unrelated_output_scores_near_zero():
    s = metrics.score(["alpha beta gamma delta"], [["one two three four"]])
    assert s["sacrebleu"] < 1 and s["sentence_bleu"] < 0.05 and s["rouge_l"] == 0


def test_multiple_references_take_the_best():
    one = metrics.score(["the cat sat on the mat"], [["a dog stood by a door"]])
    two = metrics.score(["the cat sat on the mat"], [["a dog stood by a door", "the cat sat on the mat"]])
    assert two["rouge_l"] == pytest.approx(1.0) and two["sacrebleu"] > one["sacrebleu"]


def test_dist_and_length():
    assert metrics.dist_n(["a a b", "b c"], 1) == pytest.approx(3 / 5)
    assert metrics.average_length(["a a b", "b c"]) == 2.5


def test_mbr_picks_the_consensus_candidate():
    cands = ["the man went home", "the man went to his home", "the man went home", "purple elephants dance"]
    assert cands[metrics.mbr_pick(cands)] == "the man went home"


def test_self_bleu_and_div4():
    same = ["a b c d e f"] * 3
    m = metrics.pairwise_bleu(same)
    assert metrics.self_bleu(m) == pytest.approx(1.0)
    assert metrics.div_4(same) == pytest.approx(3 / 9)
    diff = ["a b c d e", "f g h i j", "k l m n o"]
    assert metrics.self_bleu(metrics.pairwise_bleu(diff)) < 0.05 and metrics.div_4(diff) == 1.0


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError):
        metrics.score(["a"], [])
