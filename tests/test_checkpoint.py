"""Run folders and checkpoints at the engine level: the full state, the fallback past an incomplete
checkpoint, the newest run, atomic files. Damaged, tampered and mismatched checkpoints through the
command line: test_safe_loading.py; interrupted saves and `keep`: test_crash_safety.py."""

import json

import pytest
import torch

from diffutext.checkpoint import CheckpointError, atomic_write, list_checkpoints, load_weights, newest_run, open_run
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
    assert all(torch.equal(p, ck.weights("ema")[name]) for name, p in model.state_dict().items())
    assert any(not torch.equal(a, b) for a, b in zip(ck.weights("ema").values(), ck.weights("model").values()))
    log = [json.loads(line) for line in (tiny_run / "log.jsonl").read_text().splitlines()]
    assert {"loss", "mse", "decoder_nll", "tT", "lr", "grad_norm", "tokens_per_s"} <= set(log[0])


def test_checkpoint_without_manifest_is_never_loaded(run_copy):
    newest = list_checkpoints(run_copy)[-1]
    (newest / "manifest.json").unlink()
    assert open_run(run_copy).step == 10  # falls back to the previous complete checkpoint
    for ck in list_checkpoints(run_copy):
        (ck / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        open_run(run_copy)


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
