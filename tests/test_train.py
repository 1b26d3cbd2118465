"""The training loop: it learns, resumes exactly, post-trains and refuses to clobber."""

import json
from dataclasses import replace

import pytest
import torch

from diffutext.checkpoint import open_run
from diffutext.config import resolve
from diffutext.train import TrainError, train


def test_loss_goes_down(tmp_path):
    cfg = resolve("tiny", {"train": {"max_steps": 200, "lr": 3e-3, "log_every": 10, "eval_every": 0, "save_every": 0}})
    train(cfg, tmp_path / "run", device="cpu")
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["mse"] < 0.7 * log[0]["mse"]


def test_resume_ends_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    cfg = resolve("tiny", {"train": {"max_steps": 16, "save_every": 8, "eval_every": 0}})
    train(cfg, tmp_path / "whole", device="cpu")

    class Killed(Exception):
        pass

    def kill_after_first_save(event, info):
        if event == "save" and info["step"] == 8:
            raise Killed

    with pytest.raises(Killed):
        train(cfg, tmp_path / "split", device="cpu", callback=kill_after_first_save)
    train(cfg, tmp_path / "split", resume=True, device="cpu")
    a, b = open_run(tmp_path / "whole"), open_run(tmp_path / "split")
    assert a.step == b.step == 16
    for which in ("model", "ema"):
        wa, wb = a.weights(which), b.weights(which)
        assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_distance_penalty_trains_and_logs_every_term(tmp_path):
    cfg = resolve("tiny", {"train": {"max_steps": 10, "distance_penalty": 2.0, "eval_every": 0}})
    train(cfg, tmp_path / "dp", device="cpu")
    log = [json.loads(line) for line in (tmp_path / "dp" / "log.jsonl").read_text().splitlines()]
    assert {"mse", "mse_partner", "penalty", "decoder_nll", "tT", "partner_valid"} <= set(log[-1])


def test_init_from_starts_a_fresh_run_from_trained_weights(tiny_run, tmp_path):
    cfg = resolve("tiny", {"train": {"max_steps": 4, "init_from": str(tiny_run), "distance_penalty": 1.0, "eval_every": 0}})
    train(cfg, tmp_path / "post", device="cpu")
    post = open_run(tmp_path / "post")
    assert post.step == 4 and post.vocab.to_str() == open_run(tiny_run).vocab.to_str()


def test_existing_run_folder_is_not_clobbered(tiny_run):
    before = sorted(p.name for p in tiny_run.rglob("*"))
    with pytest.raises(TrainError, match="already exists"):
        train(resolve("tiny"), tiny_run, device="cpu")
    assert sorted(p.name for p in tiny_run.rglob("*")) == before
