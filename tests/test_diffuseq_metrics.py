"""DiffuSeq's scripts/eval_seq2seq.py set (diffuseq_metrics.py) on a fixture whose numbers are computed by hand
from the script's definitions, and `evaluate` reading DiffuSeq's decoded files and seed folders.

BLEU by hand: for sentences whose n-gram precisions are all non-zero, nltk's method4 smoothing changes nothing and
BLEU-4 = BP · (p1·p2·p3·p4)^(1/4), BP = exp(1 − r/c) when the hypothesis (c words) is shorter than the reference
(r words), else 1. For a k-word hypothesis that is a prefix of the reference, every p_n = 1: BLEU = exp(1 − r/k).
For an m-word hypothesis whose first k words are the whole reference: p_n = (k − n + 1)/(m − n + 1), BP = 1.
"""

import json
import math

import pytest

from diffutext import diffuseq_metrics as d
from diffutext import metrics
from helpers import invoke

S4, S8, S12 = "a b c d", "a b c d e f g h", "a b c d e f g h i j k l"


def prefix_bleu(m: int, k: int) -> float:
    """BLEU-4 of an m-word hypothesis whose first k words are the reference."""
    return math.prod((k - n + 1) / (m - n + 1) for n in range(1, 5)) ** 0.25


# The fixture: DiffuSeq decoded lines as its sample_seq2seq.py writes them (special tokens kept).
LINES = [
    {"recover": "[CLS] a b c d [SEP]", "reference": "[CLS] a b c d e f g h [SEP]", "source": "[CLS] s [SEP] [SEP]"},
    {"recover": "the cat sat on the mat", "reference": "the cat sat on the mat", "source": "s"},
    {"recover": "Hello, World!", "reference": "hello world foo", "source": "s"},
    {"recover": "[CLS] [SEP] [PAD]", "reference": "[CLS] a b [SEP]", "source": "s"},
]
# By hand, line by line:
#  1. cleaned " a b c d " / " a b c d e f g h ": BLEU (2023: the reference in the reference slot) = exp(1 − 8/4);
#     (2022: swapped) the 8 words against the 4 = prefix_bleu(8, 4) = (1/70)^(1/4); ROUGE-L: LCS 4, P = 1, R = 1/2,
#     F = 2/3 (float32); dist-1 = 4/4; length = len(" a b c d ".split(" ")) = 6 (two empty strings).
#  2. identical: BLEU 1 both ways, ROUGE-L 1, dist-1 = 5/6 ("the" twice), length 6.
#  3. "Hello," / "World!" match no reference word: BLEU 0; ROUGE-L lower-cases and splits at punctuation:
#     [hello, world] against [hello, world, foo]: P = 1, R = 2/3, F = 0.8 (float32); dist-1 = 1; length 2.
#  4. cleaned "  " (an empty output): BLEU 0, ROUGE-L 0, dist-1 0, length = len("  ".split(" ")) = 3.
F32_TWO_THIRDS, F32_FOUR_FIFTHS = 0.6666666865348816, 0.800000011920929
EXPECTED = {
    "2023": {"diffuseq_bleu": (math.exp(-1) + 1) / 4},
    "2022": {"diffuseq_bleu": ((1 / 70) ** 0.25 + 1) / 4},
}
COMMON = {
    "diffuseq_rouge_l": (F32_TWO_THIRDS + 1 + F32_FOUR_FIFTHS + 0) / 4,
    "diffuseq_dist_1": (1 + 5 / 6 + 1 + 0) / 4,
    "diffuseq_avg_len": (6 + 6 + 2 + 3) / 4,
    "diffuseq_count": 4,
}


@pytest.mark.parametrize("script", ["2023", "2022"])
def test_the_fixture_scores_as_computed_by_hand(script):
    assert prefix_bleu(8, 4) == pytest.approx((1 / 70) ** 0.25)
    recovers = [d.clean_recover(x["recover"]) for x in LINES]
    references = [d.clean_reference(x["reference"]) for x in LINES]
    assert recovers[0] == " a b c d " and recovers[3] == "  " and references[0] == " a b c d e f g h "
    got = d.score(recovers, references, script)
    for key, value in {**EXPECTED[script], **COMMON}.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    # the textbook sentence BLEU is the 2023 order on a single reference, without the script's cleaning
    assert metrics.sentence_bleu([S4], [[S8]]) == pytest.approx(math.exp(-1))


def test_mbr_and_self_bleu_follow_the_scripts_orders():
    """Pairwise BLEU of S4, S8, S12 (each a prefix of the next) by hand:
    hypothesis shorter: B(4|8) = e^-1, B(4|12) = e^-2, B(8|12) = e^-0.5;
    hypothesis longer:  B(8|4) = (1/70)^¼, B(12|4) = (1/495)^¼, B(12|8) = (14/99)^¼."""
    cands = [S4, S8, S12]
    short = {(0, 1): math.exp(-1), (0, 2): math.exp(-2), (1, 2): math.exp(-0.5)}
    long_ = {(0, 1): prefix_bleu(8, 4), (0, 2): prefix_bleu(12, 4), (1, 2): prefix_bleu(12, 8)}
    assert long_[(1, 2)] == pytest.approx((14 / 99) ** 0.25) and long_[(0, 2)] == pytest.approx((1 / 495) ** 0.25)
    # self-BLEU: mean of get_bleu(c_i, c_j) over i < j only: 2023 scores c_i against c_j (shorter against longer here)
    sb23, div23 = d.diversity_of_set(cands, "2023")
    sb22, _ = d.diversity_of_set(cands, "2022")
    assert sb23 == pytest.approx(sum(short.values()) / 3) and sb22 == pytest.approx(sum(long_.values()) / 3)
    # diffutext's own self-BLEU takes both directions: the mean of all six
    assert metrics.self_bleu(metrics.pairwise_bleu(cands)) == pytest.approx((sum(short.values()) + sum(long_.values())) / 6)
    assert div23 == pytest.approx(9 / 15)  # 4-grams: 1 + 5 + 9, distinct: the 9 of S12 (the others are among them)
    # MBR, 2023: row sums B(c_i | c_j): 0.503, 0.952, 0.825 -> 1; 2022: B(c_j | c_i): 0.558, 0.981, 0.742 -> 1
    assert d.select_best(cands, "2023") == 1 and d.select_best(cands, "2022") == 1
    assert d.select_best([S12, S12, S4]) == 0  # a tie (S12 and S12: 1 + B(12|4) each) goes to the first
    assert d.diversity_of_set([S4]) == (0.0, 1.0)


def write_seed_folder(folder, seeds):
    folder.mkdir()
    for name, rows in seeds.items():
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "notes.txt").write_text("not a seed file\n")  # the script globs *json: ignored


def test_evaluate_reads_a_decoded_file_and_a_seed_folder(tmp_path):
    one = tmp_path / "seed10_step2000.json"
    one.write_text("".join(json.dumps(x) + "\n" for x in LINES))
    result = invoke("evaluate", one, "--json", tmp_path / "m.json")
    assert result.exit_code == 0, result.output
    assert "DiffuSeq's eval_seq2seq.py (2023)" in " ".join(result.output.split())
    scores = json.loads((tmp_path / "m.json").read_text())
    assert scores["diffuseq_bleu"] == pytest.approx(EXPECTED["2023"]["diffuseq_bleu"])
    assert scores["diffuseq_avg_len"] == COMMON["diffuseq_avg_len"] and scores["count"] == 4 and "sacrebleu" in scores

    ref = "[CLS] a b c d e f g h i j k l [SEP]"
    folder = tmp_path / "out"
    write_seed_folder(
        folder, {f"seed{i}.json": [{"recover": f"[CLS] {c} [SEP]", "reference": ref, "source": "s"}] for i, c in enumerate([S4, S8, S12])}
    )
    assert invoke("evaluate", folder, "--mbr", "--json", tmp_path / "mbr.json").exit_code == 0
    mbr = json.loads((tmp_path / "mbr.json").read_text())
    assert mbr["seed_files"] == 3 and mbr["diffuseq_bleu"] == pytest.approx(math.exp(-0.5))  # the pick, S8, against S12
    assert invoke("evaluate", folder, "--diffuseq-script", "2022", "--json", tmp_path / "div.json").exit_code == 0
    div = json.loads((tmp_path / "div.json").read_text())
    assert div["diffuseq_bleu"] == pytest.approx((prefix_bleu(12, 4) + prefix_bleu(12, 8) + 1) / 3)  # the mean of the files
    assert div["diffuseq_self_bleu"] == pytest.approx((prefix_bleu(8, 4) + prefix_bleu(12, 4) + prefix_bleu(12, 8)) / 3)
    assert set(div["files"]) == {"seed0.json", "seed1.json", "seed2.json"}


def test_seed_files_of_different_lengths_are_refused(tmp_path):
    folder = tmp_path / "out"
    line = {"recover": "a", "reference": "a", "source": "s"}
    write_seed_folder(folder, {"seed1.json": [line], "seed2.json": [line, line]})
    from helpers import assert_one_line_error

    assert_one_line_error(invoke("evaluate", folder, "--mbr"), "differ in length")


def test_sample_format_diffuseq_writes_seed_files_that_its_evaluation_reads(tiny_run, tmp_path):
    """`sample --format diffuseq`: one seed<K>.json of {recover, reference, source} per seed, the same text as the
    jsonl output's candidates; `evaluate FOLDER` (eval_seq2seq.py's reading) scores them."""
    args = ("sample", "--checkpoint", tiny_run, "--limit", 3, "--steps", 4, "--seeds", 2, "--show", 0)
    assert invoke(*args, "--out", tmp_path / "p.jsonl").exit_code == 0
    result = invoke(*args, "--format", "diffuseq", "--out", tmp_path / "ds")
    assert result.exit_code == 0, result.output
    rows = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == ["seed0.json", "seed1.json"]
    for k in range(2):
        lines = [json.loads(x) for x in (tmp_path / "ds" / f"seed{k}.json").read_text().splitlines()]
        assert [set(x) for x in lines] == [{"recover", "reference", "source"}] * 3
        assert [x["recover"] for x in lines] == [r["candidates"][k] for r in rows]
        assert [x["source"] for x in lines] == [r["src"] for r in rows] and [x["reference"] for x in lines] == [r["trg"] for r in rows]
    assert invoke("evaluate", tmp_path / "ds", "--json", tmp_path / "m.json").exit_code == 0
    assert json.loads((tmp_path / "m.json").read_text())["seed_files"] == 2
    from helpers import assert_one_line_error

    assert_one_line_error(invoke("sample", "--checkpoint", tiny_run, "--format", "diffuseq"), "give --out too")
