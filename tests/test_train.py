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


@pytest.mark.parametrize("dropout", [0.0, 0.2])  # 0.2: the lean ops' dropout masks follow the resumed RNG
def test_resume_ends_bitwise_equal_to_an_uninterrupted_run(tmp_path, dropout):
    cfg = resolve("tiny", {"model": {"dropout": dropout}, "train": {"max_steps": 16, "save_every": 8, "eval_every": 0}})
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


def test_lossaware_timesteps_warm_up_then_favour_high_loss_and_stay_unbiased():
    from diffutext.timesteps import LossAwareTimesteps

    ts = LossAwareTimesteps(T=20, device=torch.device("cpu"))
    t, w = ts.sample(64)
    assert torch.allclose(w, torch.ones(64))  # uniform until every t has 10 losses
    for _ in range(10):  # every t seen 10 times, in one batch with repeats
        ts.update(torch.arange(20).repeat(3), torch.arange(20).float().repeat(3) + 1)
    assert (ts.counts == 30).all() and torch.allclose(ts.losses, (torch.arange(20).float() + 1)[:, None].expand(20, 10))
    p = ts.weights()
    assert p[19] > p[0] * 10 and p.sum().item() == pytest.approx(1.0)
    torch.manual_seed(0)
    t, w = ts.sample(20000)
    assert torch.allclose(w, 1 / (20 * p[t]))
    assert (w * 1.0).mean().item() == pytest.approx(1.0, rel=0.05)  # importance weights keep the mean


def test_lossaware_training_resumes_with_its_history(tmp_path):
    cfg = resolve("tiny", {"diffusion": {"timestep_sampler": "lossaware", "T": 50}, "train": {"max_steps": 12, "save_every": 6, "eval_every": 0}})
    train(cfg, tmp_path / "run", device="cpu")
    state = open_run(tmp_path / "run").state()
    assert state["timesteps"]["counts"].sum() == 12 * cfg.train.batch_size
