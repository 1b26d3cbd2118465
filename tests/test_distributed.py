"""Data parallelism: torchrun with 2 CPU processes (gloo) follows the single-process trajectory,
resumes from rank 0's checkpoint, accumulates gradients without extra all-reduces, and decodes
each input once, gathered back in order. The two torchrun tests start real process groups (several
interpreters each) and are marked `slow` (`python -m pytest -m slow`); the in-process gloo test runs
in the default run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffutext.checkpoint import open_run
from diffutext.config import resolve
from diffutext.train import train
from helpers import invoke

# Constant lr (so that stopping at step 4 and resuming to 8 keeps the schedule), a log line per
# step, no dropout (tiny has none) and no validation pass.
TRAIN = {"lr_schedule": "constant", "log_every": 1, "eval_every": 0, "save_every": 4}


@pytest.fixture(autouse=True)
def one_thread():
    """torchrun's workers run one thread each; so does the single process they are compared with
    (matrix products may round differently with another thread count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def torchrun(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "diffutext", *map(str, args)]
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def losses(run: Path) -> list[tuple[int, float, float]]:
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["mse"]) for r in rows if "loss" in r]


@pytest.mark.slow
def test_two_processes_with_accumulation_match_one_process_and_resume(small_task, tmp_path):
    toml = "\n".join(
        ['preset = "tiny"', "[train]", f"task = {json.dumps(str(small_task))}", *(f"{k} = {json.dumps(v)}" for k, v in TRAIN.items())]
    )
    (tmp_path / "cfg.toml").write_text(toml + "\n")
    train(resolve("tiny", {"train": {**TRAIN, "task": str(small_task), "max_steps": 8}}), tmp_path / "one", device="cpu")

    # 2 ranks × 2 micro-steps × 2 rows = the global batch of 8; stop at step 4, resume on both ranks to 8
    torchrun("train", "--config", "cfg.toml", "--max-steps", 4, "--grad-accum", 2, "--out", "two", "--device", "cpu", cwd=tmp_path)
    result = torchrun("train", "--config", "cfg.toml", "--max-steps", 8, "--out", "two", "--resume", "--device", "cpu", cwd=tmp_path)
    assert result.stdout.count("run folder") == 1  # rank 0 alone reports

    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [s for s, _, _ in one] == [s for s, _, _ in two] == list(range(1, 9))  # one log, written once
    for (_, l1, m1), (_, l2, m2) in zip(one, two):
        assert l2 == pytest.approx(l1, rel=1e-5) and m2 == pytest.approx(m1, rel=1e-5)
    a, b = open_run(tmp_path / "one"), open_run(tmp_path / "two")
    assert b.step == 8 and b.config.train.grad_accum == 2
    wa, wb = a.weights("model"), b.weights("model")
    # atol 1e-4, a tenth of one step's lr: the attention key bias has an exactly zero gradient
    # (softmax ignores it), so its float noise differs between reduction orders and Adam scales
    # noise up to lr-sized steps; every other weight agrees to ~1e-6.
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-4) for k in wa)


def test_accumulation_matches_one_big_batch_and_all_reduces_once_per_step(small_task, tmp_path, monkeypatch):
    """One process in a gloo group of one: DDP is on, and a comm hook counts the all-reduces."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    calls = []
    real = torch.nn.parallel.DistributedDataParallel

    class Counting(real):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.register_comm_hook(None, lambda state, bucket: calls.append(1) or allreduce_hook(dist.group.WORLD, bucket))

    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", Counting)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        counts, logs = {}, {}
        for k in (1, 4):
            calls.clear()
            cfg = resolve(
                "tiny",
                {"train": {"task": str(small_task), "max_steps": 3, "grad_accum": k, "log_every": 1, "eval_every": 0, "save_every": 0}},
            )
            train(cfg, tmp_path / f"k{k}", device="cpu")
            counts[k], logs[k] = len(calls), losses(tmp_path / f"k{k}")
    finally:
        dist.destroy_process_group()
    assert counts[1] > 0 and counts[4] == counts[1]  # the same buckets, once per optimizer step
    for (_, l1, _), (_, l4, _) in zip(logs[1], logs[4]):
        assert l4 == pytest.approx(l1, rel=1e-5)


def test_batch_that_does_not_split_is_refused(tmp_path):
    from diffutext.config import ConfigError

    with pytest.raises(ConfigError, match="multiple of train.grad_accum"):
        resolve("tiny", {"train": {"grad_accum": 3}})


@pytest.mark.slow
def test_two_processes_decode_each_input_once_in_order(tiny_run, tmp_path):
    one = tmp_path / "one.jsonl"
    args = [
        "sample",
        "--checkpoint",
        str(tiny_run),
        "--steps",
        "4",
        "--limit",
        "7",
        "--batch-size",
        "2",
        "--seeds",
        "2",
        "--device",
        "cpu",
        "--precision",
        "fp32",
    ]
    result = invoke(*args, "--out", one)
    assert result.exit_code == 0, result.output
    torchrun(*args, "--out", "two.jsonl", cwd=tmp_path)
    rows_one = [json.loads(x) for x in one.read_text().splitlines()]
    rows_two = [json.loads(x) for x in (tmp_path / "two.jsonl").read_text().splitlines()]
    assert len(rows_two) == 7 and rows_two == rows_one  # the same candidates and MBR picks, in input order
