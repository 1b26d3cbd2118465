"""Exact resume and graceful stop with real processes.

SLOW (about a minute, ~10 interpreter start-ups): a `python -m diffutext train` run is SIGKILLed at
random steps 5 times, resumed after each kill, and must end with the same model and EMA weights,
bitwise, as the same run left alone, and the same log.jsonl (no duplicated or torn records).
SIGTERM / SIGINT stop a run with a checkpoint, exit 143 / 130 and print the command that resumes it;
running that command finishes the run, again bitwise equal. Those three are marked `slow`: the default
`python -m pytest` skips them, `python -m pytest -m slow` runs them. The signal-handler tests at the end
run in process, in a second, in the default run.
"""

import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from diffutext.checkpoint import list_checkpoints, open_run
from helpers import invoke

SLOW = [pytest.mark.slow, pytest.mark.timeout(1200)]  # generous: the machine is shared


def slow(test):
    for mark in SLOW:
        test = mark(test)
    return test


MAX_STEPS, SAVE_EVERY = 120, 7  # save_every not a multiple of log_every: resumes replay part of a log window
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
TIMING = ("tokens_per_s", "elapsed_s")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    from diffutext.data.tasks import embedded_pairs

    task = root / "task"  # a small DiffuSeq-style folder: start-up (packing, BPE) is most of each process's time
    task.mkdir()
    for split, n in (("train", 400), ("valid", 40), ("test", 40)):
        (task / f"{split}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in embedded_pairs("bible-basic", split)[:n]))
    toml = root / "log.toml"
    toml.write_text("[train]\nlog_every = 3\neval_every = 10\n")
    args = [
        sys.executable,
        "-m",
        "diffutext",
        "train",
        "--preset",
        "tiny",
        "--max-steps",
        str(MAX_STEPS),
        "--save-every",
        str(SAVE_EVERY),
        "--device",
        "cpu",
        "--config",
        str(toml),
        "--task",
        str(task),
    ]
    whole = root / "whole"
    done = subprocess.run(args + ["--out", str(whole)], env=ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    return root, args, whole


def last_logged_step(run: Path) -> int:
    try:
        lines = (run / "log.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return -1
    for line in reversed(lines):
        try:
            return json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError):
            continue
    return -1


def start_and_wait(cmd, run: Path, target: int) -> subprocess.Popen | None:
    """Start cmd and return it once the run has logged a step >= target (None if it finished first)."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while last_logged_step(run) < target:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.communicate(timeout=300)
            return None
        time.sleep(0.005)
    return proc


def assert_same_run(a_dir: Path, b_dir: Path) -> None:
    a, b = open_run(a_dir), open_run(b_dir)
    assert a.step == b.step == MAX_STEPS
    for which in ("model", "ema"):
        wa, wb = a.weights(which), b.weights(which)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), which
    sa, sb = a.state()["optimizer"]["state"], b.state()["optimizer"]["state"]
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])

    def records(run):
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in (run / "log.jsonl").read_text().splitlines()]

    assert records(a_dir) == records(b_dir)


@slow
def test_sigkill_at_random_steps_five_times_then_resume_is_bitwise_equal(setup):
    root, args, whole = setup
    run = root / "killed"
    rng = random.Random(1234)
    edges = [4 + (MAX_STEPS - 12) * i // 5 for i in range(6)]  # five segments of the run, one kill in each
    kills = []
    for i in range(5):
        target = rng.randint(edges[i], edges[i + 1] - 1)
        cmd = args + ["--out", str(run)] + (["--resume"] if i else [])
        proc = start_and_wait(cmd, run, target)
        assert proc is not None, f"the run finished before kill {i + 1} (target step {target})"
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=300)
        assert proc.returncode == -signal.SIGKILL
        ckpts = list_checkpoints(run)
        kills.append((last_logged_step(run), int(ckpts[-1].name.split("-")[1]) if ckpts else 0))
    done = subprocess.run(args + ["--out", str(run), "--resume"], env=ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    print(f"\nSIGKILLs (last logged step, checkpoint resumed from): {kills}")
    assert len(kills) == 5 and any(step % SAVE_EVERY for step, _ in kills)
    assert_same_run(whole, run)


@slow
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_save_exit_and_print_the_resume_command(setup, sig, code):
    root, args, whole = setup
    run = root / f"stopped-{sig.name}"
    proc = start_and_wait(args + ["--out", str(run)], run, 40)
    assert proc is not None
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == code, stderr
    last = stderr.strip().splitlines()[-1]
    assert "Traceback" not in stderr
    assert last.startswith(f"stopped by {sig.name} at step ") and "checkpoint saved; resume with: diffutext train" in last
    step = int(last.split(" at step ")[1].split(",")[0])
    assert 40 <= step < MAX_STEPS and open_run(run).step == step  # the checkpoint is at the very step it stopped
    if sig == signal.SIGTERM:  # the printed command, as printed, finishes the run exactly
        command = shlex.split(last.split("resume with: ")[1])
        assert command[:2] == ["diffutext", "train"]
        done = subprocess.run([sys.executable, "-m", "diffutext", *command[1:]], env=ENV, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr
        assert_same_run(whole, run)


# ---------------------------------------------------------------- the signal handler itself (in process, fast)


def test_stop_signals_first_sets_a_flag_second_stops_at_once():
    from diffutext.interrupt import StopSignals

    before = signal.getsignal(signal.SIGINT)
    with StopSignals() as stop:
        assert not stop.requested()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested() and stop.exit_code == 143 and stop.name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler raises at the next bytecode, well before this ends
        assert stop.exit_code == 130
    assert signal.getsignal(signal.SIGINT) is before


def test_a_second_sigint_in_the_cli_stops_at_once_with_130(tmp_path, monkeypatch):
    import diffutext.train

    def fake_train(config, run_dir, *, should_stop, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        assert should_stop()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
        raise AssertionError("the second SIGINT did not stop at once")

    monkeypatch.setattr(diffutext.train, "train", fake_train)
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under a background shell
    result = invoke("train", "--preset", "tiny", "--out", tmp_path / "run", "--device", "cpu")
    assert result.exit_code == 130, result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("stopped at once by a second SIGINT") and "--resume" in last
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back


def test_ctrl_c_in_sample_exits_130_and_keeps_the_previous_output(tiny_run, tmp_path, monkeypatch):
    import diffutext.evaluate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(diffutext.evaluate, "decode", interrupted)
    out = tmp_path / "o.jsonl"
    out.write_text("previous\n")
    result = invoke("sample", "--checkpoint", tiny_run, "--steps", 4, "--limit", 1, "--device", "cpu", "--out", out)
    assert result.exit_code == 130 and "Traceback" not in result.output  # typer turns Ctrl-C into exit 130
    assert out.read_text() == "previous\n"
