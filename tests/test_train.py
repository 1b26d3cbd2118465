"""The training loop: it learns, resumes exactly (also before its first checkpoint, and with the
loss-aware sampler's history), post-trains from another run's weights, and logs every Distance
Penalty term with values that add up to the loss."""

import json
import math

import pytest
import torch

from diffutext.checkpoint import list_checkpoints, open_run
from diffutext.config import resolve
from diffutext.train import train

TIMING = ("tokens_per_s", "elapsed_s")


def tiny(task, model=None, diffusion=None, **train_fields):
    """The tiny preset on `task` without validation passes, with these [train] fields."""
    return resolve(
        "tiny", {"model": model or {}, "diffusion": diffusion or {}, "train": {"task": str(task), "eval_every": 0, **train_fields}}
    )


def records(run):
    """log.jsonl without its wall-clock fields."""
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in (run / "log.jsonl").read_text().splitlines()]


class Killed(Exception):
    pass


def kill_at(event: str, step: int):
    def callback(name, info):
        if name == event and info["step"] == step:
            raise Killed

    return callback


def test_loss_goes_down(tmp_path, small_task):
    train(tiny(small_task, max_steps=60, lr=1e-2, log_every=10, save_every=0), tmp_path / "run", device="cpu")
    log = records(tmp_path / "run")
    assert log[-1]["mse"] < 0.7 * log[0]["mse"]  # measured: 0.84 over steps 1-10, 0.41 over 51-60


def test_resume_ends_bitwise_equal_to_an_uninterrupted_run(tmp_path, small_task):
    """Killed at step 4, before its first checkpoint (resume starts it over in place), then killed just
    after the checkpoint at step 6, mid log window (resume continues from it): the run ends bitwise equal
    to the run left alone, weights, EMA, optimizer state and every log record. Dropout 0.2: the lean
    ops' dropout masks follow the resumed RNG."""
    cfg = tiny(small_task, model={"dropout": 0.2}, max_steps=12, save_every=6, log_every=4)
    train(cfg, tmp_path / "whole", device="cpu")
    split = tmp_path / "split"
    with pytest.raises(Killed):
        train(cfg, split, device="cpu", callback=kill_at("log", 4))
    assert list_checkpoints(split) == [] and (split / "config.json").is_file()
    with pytest.raises(Killed):
        train(cfg, split, resume=True, device="cpu", callback=kill_at("save", 6))
    assert [p.name for p in list_checkpoints(split)] == ["step-00000006"]
    train(cfg, split, resume=True, device="cpu")
    a, b = open_run(tmp_path / "whole"), open_run(split)
    assert a.step == b.step == 12
    for which in ("model", "ema"):
        wa, wb = a.weights(which), b.weights(which)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), which
    sa, sb = a.state()["optimizer"]["state"], b.state()["optimizer"]["state"]
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    assert [r["step"] for r in records(split)] == [4, 8, 12] and records(split) == records(tmp_path / "whole")


def test_distance_penalty_trains_and_logs_every_term(tmp_path, small_task):
    """Every logged record holds the DP terms, and their means add up: loss = ½·(mse + mse_partner +
    2·decoder_nll + 2·tT + λ·penalty) (method.md §3), the penalty is positive, a share of partners valid."""
    lam = 2.0
    train(tiny(small_task, max_steps=10, distance_penalty=lam, log_every=5, save_every=0), tmp_path / "dp", device="cpu")
    log = records(tmp_path / "dp")
    assert [r["step"] for r in log] == [5, 10]
    for r in log:
        assert {"mse", "mse_partner", "penalty", "decoder_nll", "tT", "partner_valid"} <= set(r)
        assert all(math.isfinite(r[k]) for k in ("loss", "mse", "mse_partner", "penalty", "decoder_nll", "tT"))
        assert r["penalty"] > 0 and r["mse_partner"] > 0 and 0 < r["partner_valid"] <= 1
        total = 0.5 * (r["mse"] + r["mse_partner"] + 2 * r["decoder_nll"] + 2 * r["tT"] + lam * r["penalty"])
        assert r["loss"] == pytest.approx(total, rel=1e-5)


def test_init_from_starts_a_fresh_run_from_trained_weights(tiny_run, tmp_path, small_task):
    """With a learning rate too small to move a float32 weight, the post-trained run still holds the
    source run's weights (not a fresh init), its EMA started from the source's EMA and moved only by
    the EMA rule, and its optimizer and step counter are its own."""
    steps = 3
    cfg = tiny(small_task, max_steps=steps, init_from=str(tiny_run), distance_penalty=1.0, lr=1e-30, save_every=0)
    train(cfg, tmp_path / "post", device="cpu")
    src, post = open_run(tiny_run), open_run(tmp_path / "post")
    assert post.step == steps and src.step == 20 and post.vocab.to_str() == src.vocab.to_str()
    assert all(int(s["step"]) == steps for s in post.state()["optimizer"]["state"].values())
    model, ema = src.weights("model"), src.weights("ema")
    assert all(torch.equal(post.weights("model")[k], v) for k, v in model.items())
    kept = math.prod(min(cfg.train.ema_decay, (1 + s) / (10 + s)) for s in range(1, steps + 1))  # the EMA rule of train.py
    for k, v in post.weights("ema").items():
        assert torch.allclose(v, model[k] + kept * (ema[k] - model[k]), rtol=0, atol=1e-6), k
    assert any(not torch.equal(model[k], ema[k]) for k in model)  # the two sources differ: the check can tell them apart


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


def test_lossaware_training_resumes_with_its_history(tmp_path, small_task):
    """T = 10: the sampler leaves its uniform warm-up (10 losses for every t) after the resume at step 12,
    so the resumed run matches the one left alone only if the loss history came back with the checkpoint."""
    cfg = tiny(small_task, diffusion={"timestep_sampler": "lossaware", "T": 10}, max_steps=24, save_every=12)
    train(cfg, tmp_path / "whole", device="cpu")
    with pytest.raises(Killed):
        train(cfg, tmp_path / "split", device="cpu", callback=kill_at("save", 12))
    assert open_run(tmp_path / "split").state()["timesteps"]["counts"].sum() == 12 * cfg.train.batch_size
    train(cfg, tmp_path / "split", resume=True, device="cpu")
    a, b = open_run(tmp_path / "whole"), open_run(tmp_path / "split")
    ha, hb = a.state()["timesteps"], b.state()["timesteps"]
    assert ha.keys() == hb.keys() and all(torch.equal(ha[k], hb[k]) for k in ha)
    assert ha["counts"].sum() == 24 * cfg.train.batch_size and (ha["counts"] >= 10).all()  # warmed up, so weights were used
    wa, wb = a.weights("model"), b.weights("model")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
