"""The task registry: paper task names, DiffuSeq folders under --data-dir / $DIFFUTEXT_DATA, split files,
multi-reference files, and the real sets of ../shared/data."""

import json

import pytest

from diffutext.data import hub, tasks
from diffutext.data.jsonl import MissingSplit, TaskError


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def diffuseq_folder(folder, n=3, splits=("train", "valid", "test")):
    for split in splits:
        write_jsonl(folder / f"{split}.jsonl", [{"src": f"{split} source {i}", "trg": f"{split} target {i}"} for i in range(n)])
    return folder


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    """A datasets cache of each test's own (the real sets here are large enough to be cached)."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture
def offline(monkeypatch):
    """No hub and no $DIFFUTEXT_DATA."""
    monkeypatch.setattr(hub, "availability", lambda: (False, "huggingface.co: Name or service not known"))
    monkeypatch.delenv(tasks.DATA_ENV, raising=False)


def test_registry_names():
    assert set(tasks.task_names()) == {"bible-basic", "bible-modern", "wiki-auto", "qqp", "quasar-t", "roc", "ccd", "iwslt14"}
    assert set(hub.HUB) <= set(tasks.PAPER_TASKS)


@pytest.mark.parametrize(
    "task,folder",
    [
        ("wiki-auto", "wiki-auto"),
        ("wiki-auto", "WA"),
        ("qqp", "QQP"),
        ("quasar-t", "Quasar-T"),
        ("quasar-t", "quasar_t"),
        ("roc", "ROCstory"),
        ("ccd", "CommonsenseConversation"),
        ("iwslt14", "iwslt14"),
        ("iwslt14", "IWSLT14"),
    ],
)
def test_paper_task_finds_our_name_or_diffuseqs_folder(offline, tmp_path, task, folder):
    diffuseq_folder(tmp_path / folder)
    source = tasks.resolve(task, tmp_path)
    assert source.kind == "folder" and source.folder == tmp_path / folder
    assert tasks.load_split(task, "valid", tmp_path)["src"] == ["valid source 0", "valid source 1", "valid source 2"]


def test_data_dir_comes_before_the_environment(offline, tmp_path, monkeypatch):
    diffuseq_folder(tmp_path / "a" / "QQP")
    diffuseq_folder(tmp_path / "b" / "qqp")
    monkeypatch.setenv(tasks.DATA_ENV, str(tmp_path / "b"))
    assert tasks.resolve("qqp").folder == tmp_path / "b" / "qqp"
    assert tasks.resolve("qqp", tmp_path / "a").folder == tmp_path / "a" / "QQP"


def test_offline_without_local_data_is_one_line_saying_what_was_tried(offline, tmp_path):
    with pytest.raises(TaskError) as e:
        tasks.check_task("wiki-auto", tmp_path)
    message = str(e.value)
    assert "\n" not in message
    assert f"no wiki-auto / WA / wiki_auto / wikiauto folder in {tmp_path}" in message
    assert "GEM/wiki_auto_asset_turk unreachable" in message
    assert "--data-dir DIR" in message and "train.jsonl" in message


def test_a_task_without_a_hub_source_says_so(offline):
    with pytest.raises(TaskError, match="no --data-dir given and \\$DIFFUTEXT_DATA unset; no Hugging Face hub dataset is wired for it"):
        tasks.resolve("ccd")


def test_missing_data_dir_is_named(offline, tmp_path):
    with pytest.raises(TaskError, match="--data-dir .*nope does not exist"):
        tasks.resolve("qqp", tmp_path / "nope")


def test_folder_splits_and_missing_split(tmp_path):
    diffuseq_folder(tmp_path, splits=("train", "valid"))
    assert len(tasks.load_split(str(tmp_path), "train")) == 3
    with pytest.raises(MissingSplit, match="has no test.jsonl \\(found train.jsonl, valid.jsonl.*--input FILE.jsonl"):
        tasks.load_eval_split(str(tmp_path), "test")
    with pytest.raises(TaskError, match="unknown split"):
        tasks.load_split(str(tmp_path), "dev")


def test_multireference_files(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"src": "s1", "trg": "t1"}])
    write_jsonl(tmp_path / "valid.pairs.jsonl", [{"src": "v", "trg": "a"}, {"src": "v", "trg": "b"}])
    write_jsonl(tmp_path / "valid.multiref.jsonl", [{"src": "v", "refs": ["a", "b"]}])
    write_jsonl(tmp_path / "test.multiref.jsonl", [{"src": "x", "refs": ["r1", "r2", "r3"]}, {"src": "y", "trg": "r0", "refs": ["r4"]}])
    assert tasks.load_split(str(tmp_path), "valid")["trg"] == ["a", "b"]  # training reads the pairs file
    valid = tasks.load_eval_split(str(tmp_path), "valid")  # evaluation prefers the multi-reference file
    assert valid["src"] == ["v"] and valid["refs"] == [["a", "b"]] and valid["trg"] == ["a"]
    test = tasks.load_eval_split(str(tmp_path), "test")
    assert test["refs"] == [["r1", "r2", "r3"], ["r0", "r4"]] and tasks.references(test) == [["r1", "r2", "r3"], ["r0", "r4"]]
    pairs = tasks.load_split(str(tmp_path), "test")  # with only a multi-reference file, train on every reference
    assert pairs["src"] == ["x", "x", "x", "y", "y"] and pairs["trg"] == ["r1", "r2", "r3", "r0", "r4"]


def test_inputs_without_targets(tmp_path):
    path = tmp_path / "in.jsonl"
    write_jsonl(path, [{"src": "only a source"}, {"src": "with refs", "refs": ["one", "two"]}])
    ds = tasks.read_inputs(path)
    assert ds["trg"] == ["", "one"] and tasks.references(ds) == [[], ["one", "two"]]


def test_embedded_task_in_both_shapes():
    ev = tasks.load_eval_split("bible-basic", "test")
    assert ev.column_names == ["src", "trg", "refs"] and len(ev) == 389 and ev["refs"][0] == [ev["trg"][0]]


# ---- the real sets in ../shared/data ----


def test_shared_multi30k(shared_data):
    folder = str(shared_data / "multi30k" / "de2en")
    train = tasks.load_split(folder, "train")
    assert len(train) == 29000 and train[0]["trg"].startswith("Two young, White males")
    with pytest.raises(MissingSplit, match="test_2016_flickr.jsonl"):
        tasks.load_eval_split(folder, "test")  # the test set is under its own name: --input it
    assert len(tasks.read_inputs(shared_data / "multi30k" / "de2en" / "test_2016_flickr.jsonl")) == 1000


def test_shared_commongen_multireference(shared_data):
    folder = str(shared_data / "commongen")
    assert len(tasks.load_split(folder, "train")) == 39069
    assert len(tasks.load_split(folder, "valid")) == 4018
    valid = tasks.load_eval_split(folder, "valid")
    assert len(valid) == 993 and valid[0]["src"] == "field stand look" and len(valid[0]["refs"]) == 4


@pytest.mark.parametrize("name,items,n_refs", [("asset", 2000, 10), ("turkcorpus", 2000, 8)])
def test_shared_simplification_multireference(shared_data, name, items, n_refs):
    valid = tasks.load_eval_split(str(shared_data / name), "valid")
    assert len(valid) == items and all(len(r) <= n_refs for r in valid["refs"]) and max(map(len, valid["refs"])) == n_refs


def test_shared_asset_trains_on_its_valid_pairs(shared_data):
    with pytest.raises(MissingSplit, match="--train-split"):
        tasks.check_task(str(shared_data / "asset"))
    tasks.check_task(str(shared_data / "asset"), train_split="valid")
    assert len(tasks.load_split(str(shared_data / "asset"), "valid")) == 20000


def test_shared_diffuseq_folders_resolve_by_name(shared_data, offline):
    # ../shared/data holds DiffuSeq's qqp / quasar_t / iwslt14 valid splits (their train sets are too large to carry)
    for task, folder in [("qqp", "qqp"), ("quasar-t", "quasar_t"), ("iwslt14", "iwslt14")]:
        assert tasks.resolve(task, shared_data).folder == shared_data / folder
        assert len(tasks.load_eval_split(task, "valid", shared_data)) in (2048, 7283)
        with pytest.raises(MissingSplit, match="has no train.jsonl"):
            tasks.check_task(task, shared_data)
