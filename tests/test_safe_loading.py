"""Safe loading from the command line: tampered, truncated, corrupted or mismatched
checkpoints exit 2 with one line naming the file and the problem; a pickle is never executed."""

import io
import json
import pickle
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from diffutext.config import RunConfig
from diffutext.model import Denoiser
from helpers import Evil, assert_one_line_error, invoke, newest_folder, reseal


@pytest.fixture
def run(run_copy):
    return run_copy


def sample(run, *extra):
    return invoke("sample", "--checkpoint", run, "--steps", 4, "--limit", 2, "--device", "cpu", "--show", 0, *extra)


def resume(run):
    """The command that reads state.pt (decoding reads only the weights)."""
    return invoke("train", "--preset", "tiny", "--out", run, "--resume", "--max-steps", 30, "--device", "cpu")


def test_an_untouched_copy_samples_what_the_original_samples(run, tiny_run, tmp_path):
    """The control for every fault below: a copy (no path inside it points back) decodes the same text."""
    outputs = []
    for name, folder in (("copy", run), ("original", tiny_run)):
        result = sample(folder, "--out", tmp_path / f"{name}.jsonl")
        assert result.exit_code == 0, result.output
        outputs.append((tmp_path / f"{name}.jsonl").read_text())
    assert outputs[0] == outputs[1] and len(outputs[0].splitlines()) == 2


@pytest.mark.parametrize("target,weights", [("state.pt", "ema"), ("model.safetensors", "model"), ("ema.safetensors", "ema")])
@pytest.mark.parametrize("sealed", [True, False], ids=["manifest-updated", "manifest-stale"])
def test_a_pickle_placed_as_a_checkpoint_file_is_refused_and_never_run(run, tmp_path, target, weights, sealed):
    marker = tmp_path / "pwned"
    folder = newest_folder(run)
    (folder / target).write_bytes(pickle.dumps({"step": Evil(marker)}))
    if sealed:
        reseal(folder, target)
    result = resume(run) if target == "state.pt" else sample(run, "--weights", weights)
    expected = "checksum" if not sealed else ("refused to load" if target == "state.pt" else "not a valid safetensors file")
    assert_one_line_error(result, str(folder / target), expected)
    assert not marker.exists()


def test_a_torch_archive_with_a_malicious_pickle_is_refused_by_resume_and_never_read_by_sample(run, tmp_path):
    marker = tmp_path / "pwned"
    folder = newest_folder(run)
    buf = io.BytesIO()
    torch.save({"step": 20, "optimizer": Evil(marker)}, buf)  # a real zip-format torch file whose pickle calls open()
    (folder / "state.pt").write_bytes(buf.getvalue())
    reseal(folder, "state.pt")
    assert sample(run).exit_code == 0  # decoding never opens state.pt
    assert_one_line_error(resume(run), "state.pt", "refused to load")
    assert not marker.exists()
    assert newest_folder(run).name == "step-00000020"  # nothing was trained or written


@pytest.mark.parametrize("fault", ["truncated", "truncated-sealed", "bit-flip", "missing", "empty-sealed", "huge-header-sealed"])
def test_damaged_weights_exit_2_naming_the_file(run, fault):
    folder = newest_folder(run)
    path = folder / "ema.safetensors"
    data = path.read_bytes()
    if fault.startswith("truncated"):
        path.write_bytes(data[: len(data) // 2])
    elif fault == "bit-flip":
        path.write_bytes(data[:100] + bytes([data[100] ^ 0x01]) + data[101:])
    elif fault == "missing":
        path.unlink()
    elif fault == "empty-sealed":
        path.write_bytes(b"")
    elif fault == "huge-header-sealed":  # a header length far past the end of the file
        path.write_bytes((2**62).to_bytes(8, "little") + b"{}")
    if fault.endswith("sealed"):
        reseal(folder, "ema.safetensors")
    expected = {"truncated": "checksum", "bit-flip": "checksum", "missing": "missing"}.get(fault, "not a valid safetensors file")
    assert_one_line_error(sample(run), str(path), expected)


@pytest.mark.parametrize("fault", ["not-json", "not-an-object", "no-files", "wrong-step", "bool-step"])
def test_a_bad_manifest_exits_2(run, fault):
    folder = newest_folder(run)
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    text = {
        "not-json": '{"step": 20, "files": {',
        "not-an-object": "[1, 2, 3]",
        "no-files": json.dumps({"step": 20}),
        "wrong-step": json.dumps({**manifest, "step": 10}),
        "bool-step": json.dumps({**manifest, "step": True}),
    }[fault]
    path.write_text(text)
    assert_one_line_error(sample(run), "manifest.json")


@pytest.mark.parametrize("wrong", ["weights", "config"])
def test_weights_of_another_shape_exit_2(run, wrong):
    """Weights of a model with another embedding width (manifest resealed), or a config.json asking for
    another transformer width: either way the weights do not fit and the line names the file."""
    folder = newest_folder(run)
    config = json.loads((run / "config.json").read_text())
    if wrong == "weights":
        model = replace(RunConfig.from_dict(config).model, hidden_dim=8)
        save_file(Denoiser(model).state_dict(), folder / "ema.safetensors")
        reseal(folder, "ema.safetensors")
    else:
        config["model"]["width"] *= 2
        (run / "config.json").write_text(json.dumps(config))
    assert_one_line_error(sample(run), str(folder / "ema.safetensors"), "has shape", "this model needs")


def test_a_tokenizer_of_another_size_or_content_exits_2(run):
    tok_path = run / "tokenizer.json"
    original = tok_path.read_text()
    tok = json.loads(original)
    vocab = tok["model"]["vocab"]
    a, b = [k for k in vocab if k.isalpha()][-2:]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same size and still valid, but two ids swapped
    tok_path.write_text(json.dumps(tok))
    assert_one_line_error(sample(run), "tokenizer.json", "not the tokenizer this checkpoint was trained with")
    from diffutext.data.tokenizer import train_bpe

    tok_path.write_text(train_bpe(["some other words entirely"] * 10, 60).to_str())
    out = run.parent / "preds.jsonl"
    assert_one_line_error(sample(run, "--out", out), str(tok_path), "entries but the model was built for")
    assert not out.exists()
    tok_path.write_bytes(b"\xff\xfe not json")
    assert_one_line_error(sample(run), "tokenizer.json")


@pytest.mark.parametrize("text", ["", "{", "[]", '{"model": 3}', '{"model": {"width": -4}}', '{"train": {"nope": 1}}'])
def test_a_bad_config_json_exits_2(run, text):
    (run / "config.json").write_text(text)
    assert_one_line_error(sample(run), "config.json")


def test_resume_refuses_a_tampered_checkpoint_without_training(run):
    folder = newest_folder(run)
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    result = invoke("train", "--preset", "tiny", "--out", run, "--resume", "--max-steps", 30, "--device", "cpu")
    assert_one_line_error(result, "model.safetensors", "checksum")
    assert newest_folder(run).name == "step-00000020"
