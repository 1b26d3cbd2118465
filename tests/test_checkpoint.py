"""Run folders and checkpoints: full state, atomic, verified, never unpickling code."""

import json
import pickle

import pytest
import torch

from diffutext.checkpoint import CheckpointError, atomic_write, list_checkpoints, load_weights, newest_run, open_run, save_checkpoint
from diffutext.config import RunConfig
from diffutext.model import Denoiser


def test_run_folder_holds_the_full_state(tiny_run):
    ck = open_run(tiny_run)
    assert ck.step == 20 and ck.config.model.vocab_size == ck.vocab.size
    names = {p.name for p in ck.folder.iterdir()}
    assert {"model.safetensors", "ema.safetensors", "state.pt", "manifest.json"} <= names
    state = ck.state()
    assert state["step"] == 20 and "optimizer" in state and "rng" in state and "data" in state
    config = json.loads((tiny_run / "config.json").read_text())
    assert config["version"] and RunConfig.from_dict(config).model == ck.config.model
    model = Denoiser(ck.config.model)
    load_weights(model, ck.weights("ema"), "ema")
    assert any(not torch.equal(a, b) for a, b in zip(ck.weights("ema").values(), ck.weights("model").values()))
    log = [json.loads(line) for line in (tiny_run / "log.jsonl").read_text().splitlines()]
    assert {"loss", "mse", "decoder_nll", "tT", "lr", "grad_norm", "tokens_per_s"} <= set(log[0])


def _copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_checksum_mismatch_is_refused(tiny_run, tmp_path):
    run = _copy_run(tiny_run, tmp_path / "run")
    ck = open_run(run)
    data = bytearray((ck.folder / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (ck.folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        open_run(run).weights("model")


def test_checkpoint_without_manifest_is_never_loaded(tiny_run, tmp_path):
    run = _copy_run(tiny_run, tmp_path / "run")
    newest = list_checkpoints(run)[-1]
    (newest / "manifest.json").unlink()
    assert open_run(run).step == 10  # falls back to the previous complete checkpoint
    for ck in list_checkpoints(run):
        (ck / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        open_run(run)


def test_a_malicious_pickle_is_not_executed(tiny_run, tmp_path):
    run = _copy_run(tiny_run, tmp_path / "run")
    folder = list_checkpoints(run)[-1]
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    payload = pickle.dumps({"step": Evil()})
    (folder / "state.pt").write_bytes(payload)
    manifest = json.loads((folder / "manifest.json").read_text())
    import hashlib

    manifest["files"]["state.pt"] = hashlib.sha256(payload).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="refused to load"):
        open_run(run).state()
    assert not marker.exists()


def test_shape_mismatch_is_one_clear_error(tiny_run):
    ck = open_run(tiny_run)
    from dataclasses import replace

    other = Denoiser(replace(ck.config.model, width=48))
    with pytest.raises(CheckpointError, match="shape"):
        load_weights(other, ck.weights("ema"), "ema.safetensors")


def test_tokenizer_of_another_size_is_refused(tiny_run, tmp_path):
    run = _copy_run(tiny_run, tmp_path / "run")
    from diffutext.data.tokenizer import train_bpe

    (run / "tokenizer.json").write_text(train_bpe(["some other words entirely"] * 10, 60).to_str())
    with pytest.raises(CheckpointError, match="entries"):
        open_run(run)


def test_newest_run_and_missing_runs(tiny_run, tmp_path):
    with pytest.raises(CheckpointError, match="no trained run"):
        newest_run(tmp_path / "empty")
    assert newest_run(tiny_run.parent) == tiny_run


def test_atomic_write_replaces_whole_files(tmp_path):
    path = tmp_path / "out.json"
    atomic_write(path, b"first")
    atomic_write(path, b"second")
    assert path.read_bytes() == b"second"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_keep_prunes_old_checkpoints(tmp_path):
    w = {"a": torch.zeros(2)}
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, w, w, {"step": step}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]
