"""Hub conversions on small local Parquet files written in each hub dataset's own schema (no network)."""

from pathlib import Path

import datasets
import pytest

from diffutext.data import hub, tasks
from diffutext.data.jsonl import TaskError


def write_parquet(folder: Path, split: str, data: dict, features: datasets.Features) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(data, features=features).to_parquet(str(folder / f"{split}.parquet"))


def read_parquet(folder: Path, split: str):
    """As load_dataset gives a hub split, with its cache beside the file (not in the user's datasets cache)."""
    return datasets.load_dataset("parquet", data_files=str(folder / f"{split}.parquet"), split="train", cache_dir=str(folder / "hf-cache"))


S = datasets.Value("string")
GEM = datasets.Features({"gem_id": S, "gem_parent_id": S, "source": S, "target": S, "references": datasets.List(S)})
GLUE_QQP = datasets.Features(
    {"question1": S, "question2": S, "label": datasets.ClassLabel(names=["not_duplicate", "duplicate"]), "idx": datasets.Value("int32")}
)
IWSLT = datasets.Features({"translation": datasets.Translation(languages=["de", "en"])})


@pytest.fixture
def hub_files(tmp_path):
    """Local copies, in the hub schemas, of the splits each HubSource reads."""
    root = tmp_path / "hub"
    gem = root / "GEM/wiki_auto_asset_turk"
    write_parquet(
        gem,
        "train",
        {
            "gem_id": ["w-train-0", "w-train-1", "w-train-2"],
            "gem_parent_id": ["w-train-0", "w-train-1", "w-train-2"],
            "source": ["The cat, which was black, sat.", "A long complex sentence here.", ""],
            "target": ["The black cat sat.", "A short sentence.", "dropped: empty source"],
            "references": [[], [], []],
        },
        GEM,
    )
    write_parquet(
        gem,
        "validation",
        {
            "gem_id": ["w-val-0"],
            "gem_parent_id": ["w-val-0"],
            "source": ["Validation source sentence."],
            "target": ["Valid target."],
            "references": [["Valid target."]],
        },
        GEM,
    )
    write_parquet(
        gem,
        "test_asset",
        {
            "gem_id": ["asset-0"],
            "gem_parent_id": ["asset-0"],
            "source": ["An original sentence."],
            "target": [""],
            "references": [["Simple one.", "Simple two.", "Simple one."]],
        },
        GEM,
    )
    glue = root / "nyu-mll/glue"
    write_parquet(
        glue,
        "train",
        {
            "question1": ["How do I cook rice?", "Is the sky blue?"],
            "question2": ["What is the way to cook rice?", "Why is grass green?"],
            "label": [1, 0],
            "idx": [0, 1],
        },
        GLUE_QQP,
    )
    write_parquet(
        glue,
        "validation",
        {
            "question1": ["q even", "q odd", "q not dup"],
            "question2": ["p even", "p odd", "p not dup"],
            "label": [1, 1, 0],
            "idx": [10, 11, 12],
        },
        GLUE_QQP,
    )
    iwslt = root / "bbaaaa/iwslt14-de-en"
    for split in ("train", "validation", "test"):
        write_parquet(iwslt, split, {"translation": [{"de": f"ein satz ({split})", "en": f"a sentence ({split})"}]}, IWSLT)
    return root


@pytest.fixture
def online_hub(monkeypatch, hub_files):
    """The hub 'reachable', with load_dataset answered from the local Parquet files."""
    calls = []

    def fake_load(source, hub_split):
        calls.append((source.path, source.config, hub_split, source.revision, source.data_dir))
        return read_parquet(hub_files / source.path, hub_split)

    monkeypatch.setattr(hub, "_load_dataset", fake_load)
    monkeypatch.setattr(hub, "availability", lambda: (True, ""))
    monkeypatch.delenv(tasks.DATA_ENV, raising=False)
    return calls


def test_wiki_auto_conversion(hub_files):
    rows = hub.convert_wiki_auto(read_parquet(hub_files / "GEM/wiki_auto_asset_turk", "train"), "train")
    assert rows.src == ["The cat, which was black, sat.", "A long complex sentence here."]  # the empty source is skipped
    assert rows.refs == [["The black cat sat."], ["A short sentence."]]
    test = hub.convert_wiki_auto(read_parquet(hub_files / "GEM/wiki_auto_asset_turk", "test_asset"), "test")
    assert test.src == ["An original sentence."] and test.refs == [["Simple one.", "Simple two."]]


def test_qqp_conversion_keeps_duplicates_and_halves_glue_validation(hub_files):
    glue = hub_files / "nyu-mll/glue"
    train = hub.convert_qqp(read_parquet(glue, "train"), "train")
    assert train.src == ["How do I cook rice?"] and train.refs == [["What is the way to cook rice?"]]
    assert hub.convert_qqp(read_parquet(glue, "validation"), "valid").src == ["q even"]
    assert hub.convert_qqp(read_parquet(glue, "validation"), "test").src == ["q odd"]


def test_iwslt14_conversion(hub_files):
    rows = hub.convert_iwslt14(read_parquet(hub_files / "bbaaaa/iwslt14-de-en", "validation"), "valid")
    assert rows.src == ["ein satz (validation)"] and rows.refs == [["a sentence (validation)"]]


@pytest.mark.parametrize(
    "task,split,src,trg",
    [
        ("wiki-auto", "train", "The cat, which was black, sat.", "The black cat sat."),
        ("wiki-auto", "valid", "Validation source sentence.", "Valid target."),
        ("qqp", "train", "How do I cook rice?", "What is the way to cook rice?"),
        ("qqp", "test", "q odd", "p odd"),
        ("iwslt14", "test", "ein satz (test)", "a sentence (test)"),
    ],
)
def test_paper_tasks_load_from_the_hub_when_no_folder_exists(online_hub, task, split, src, trg):
    ds = tasks.load_split(task, split)
    assert ds.column_names == ["src", "trg"] and ds[0] == {"src": src, "trg": trg}
    source = hub.HUB[task]
    assert online_hub[-1] == (source.path, source.config, source.splits[split], source.revision, source.data_dir)


def test_hub_multi_reference_test_split(online_hub):
    ds = tasks.load_eval_split("wiki-auto", "test")
    assert ds["refs"][0] == ["Simple one.", "Simple two."] and ds["trg"][0] == "Simple one."
    pairs = tasks.load_split("wiki-auto", "test")
    assert len(pairs) == 2  # trained on, a multi-reference item gives one pair per reference


def test_a_local_folder_wins_over_the_hub(online_hub, tmp_path):
    folder = tmp_path / "data" / "QQP"
    folder.mkdir(parents=True)
    (folder / "train.jsonl").write_text('{"src": "local question", "trg": "local paraphrase"}\n')
    ds = tasks.load_split("qqp", "train", data_dir=tmp_path / "data")
    assert ds["src"] == ["local question"] and online_hub == []


def test_hub_schema_mismatch_is_one_clear_line(monkeypatch, hub_files):
    monkeypatch.setattr(hub, "_load_dataset", lambda source, split: read_parquet(hub_files / "bbaaaa/iwslt14-de-en", "train"))
    monkeypatch.setattr(hub, "availability", lambda: (True, ""))
    with pytest.raises(TaskError, match=r"has columns \[translation\], expected source, target, references") as e:
        tasks.load_split("wiki-auto", "train")
    assert "\n" not in str(e.value)


def test_hub_failure_says_how_to_supply_the_data(monkeypatch):
    def refuse(source, split):
        raise ConnectionError("Couldn't reach 'GEM/wiki_auto_asset_turk' on the Hub (OfflineModeIsEnabled)\nmore detail")

    monkeypatch.setattr(hub, "_load_dataset", refuse)
    monkeypatch.setattr(hub, "availability", lambda: (True, ""))
    monkeypatch.delenv(tasks.DATA_ENV, raising=False)
    with pytest.raises(TaskError) as e:
        tasks.load_split("wiki-auto", "train")
    message = str(e.value)
    assert "GEM/wiki_auto_asset_turk" in message and "--data-dir DIR" in message and "\n" not in message


def test_offline_detection(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    usable, why = hub.availability()
    assert usable and "HF_HUB_OFFLINE" in why  # offline mode still reads the local Hugging Face cache
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    usable, why = hub.availability()
    assert not usable and why.startswith("127.0.0.1: ")
