"""Multi-reference sets end to end: `sample --split` keeps every reference and `evaluate` scores BLEU and
ROUGE against all of them, shown on ../shared/data (ASSET, TurkCorpus, CommonGen)."""

import itertools
import json

import pytest

from helpers import invoke


def head(path, n):
    with open(path, encoding="utf-8") as f:
        return list(itertools.islice(f, n))


@pytest.mark.parametrize("name,k", [("asset", 3), ("turkcorpus", 5), ("commongen", 1)])
def test_evaluate_scores_against_every_reference(shared_data, tmp_path, name, k):
    """Each hypothesis is one of the later references: perfect against all references, not against the first."""
    items = [json.loads(line) for line in head(shared_data / name / "valid.multiref.jsonl", 40)]
    items = [it for it in items if len(it["refs"]) > k and it["refs"][k] != it["refs"][0]]
    multi, single = tmp_path / "multi.jsonl", tmp_path / "single.jsonl"
    multi.write_text("".join(json.dumps({"src": it["src"], "refs": it["refs"], "hyp": it["refs"][k]}) + "\n" for it in items))
    single.write_text("".join(json.dumps({"src": it["src"], "trg": it["refs"][0], "hyp": it["refs"][k]}) + "\n" for it in items))
    scores = {}
    for label, path in (("multi", multi), ("single", single)):
        out = tmp_path / f"{label}.metrics.json"
        result = invoke("evaluate", path, "--json", out)
        assert result.exit_code == 0, result.output
        scores[label] = json.loads(out.read_text())
    assert scores["multi"]["sacrebleu"] == pytest.approx(100.0) and scores["multi"]["rouge_l"] == pytest.approx(1.0)
    assert scores["multi"]["sentence_bleu"] == pytest.approx(1.0)
    assert scores["single"]["sacrebleu"] < 90 and scores["single"]["rouge_l"] < 1.0
    assert scores["single"]["sacrebleu_signature"].startswith("nrefs:1|")  # sacreBLEU saw every reference, not one
    assert scores["multi"]["sacrebleu_signature"].startswith("nrefs:") and not scores["multi"]["sacrebleu_signature"].startswith("nrefs:1|")


def test_sample_split_keeps_all_references(shared_data, tmp_path):
    """A run on a CommonGen slice decodes valid.multiref.jsonl and writes every reference with each output."""
    task = tmp_path / "commongen"
    task.mkdir()
    (task / "train.jsonl").write_text("".join(head(shared_data / "commongen" / "train.jsonl", 64)))
    (task / "valid.jsonl").write_text("".join(head(shared_data / "commongen" / "valid.jsonl", 16)))
    (task / "valid.multiref.jsonl").write_text("".join(head(shared_data / "commongen" / "valid.multiref.jsonl", 4)))
    run = tmp_path / "run"
    result = invoke("train", "--task", task, "--preset", "tiny", "--max-steps", 2, "--out", run, "--device", "cpu")
    assert result.exit_code == 0, result.output
    preds = tmp_path / "preds.jsonl"
    result = invoke("sample", "--checkpoint", run, "--split", "valid", "--steps", 4, "--out", preds, "--device", "cpu", "--show", 1)
    assert result.exit_code == 0, result.output
    assert "(+3 more)" in result.output  # the first reference is shown, the others counted
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    expected = [json.loads(line) for line in head(shared_data / "commongen" / "valid.multiref.jsonl", 4)]
    assert [r["src"] for r in rows] == [e["src"] for e in expected] and [r["refs"] for r in rows] == [e["refs"] for e in expected]
    metrics = tmp_path / "m.json"
    result = invoke("evaluate", "--checkpoint", run, "--split", "valid", "--steps", 4, "--device", "cpu", "--json", metrics)
    assert result.exit_code == 0, result.output
    assert json.loads(metrics.read_text())["count"] == 4
