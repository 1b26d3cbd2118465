"""One writer per run folder, and long decodes and grids that survive an interruption.

With real processes: a second `train` on a folder another `train` holds exits 2 at once naming the
holder, and the first finishes with each step logged once; a SIGKILLed holder leaves no stale lock;
`sample`/`evaluate` read a run while it trains. An `ablate` and a `sample --seeds K --out` killed
after their first cells / batches keep them, and the rerun reuses them and writes the same results
as an uninterrupted run. The lock and the stores themselves are tested in process too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffutext.lock import RunLocked, holder, holder_path, lock_path, run_lock
from diffutext.pieces import Pieces, fingerprint
from helpers import assert_one_line_error, invoke

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
TIMING = ("seconds", "sentences_per_s", "speedup")


def cli(*args: object) -> list[str]:
    return [sys.executable, "-m", "diffutext", *map(str, args)]


def wait_for(predicate, timeout: float = 300.0, what: str = "") -> None:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


# ---------------------------------------------------------------- the lock, in process


def hold_lock(run: Path) -> subprocess.Popen:
    """Another process that takes the run's lock and keeps it until killed."""
    code = (
        "import sys, time; from diffutext.lock import run_lock\n"
        "with run_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(600)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(run)], env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_the_lock_names_its_holder_is_reentrant_and_is_released(tmp_path):
    run = tmp_path / "run"
    with run_lock(run):
        assert f"PID {os.getpid()}" in holder(run) and lock_path(run) == tmp_path / ".run.lock"
        with run_lock(run):  # the CLI holds it, the engine takes it again
            pass
        assert f"PID {os.getpid()}" in holder(run)  # the inner release keeps the lock and its sidecar
    other = hold_lock(run)
    try:
        with pytest.raises(RunLocked, match=f"PID {other.pid} on host .*: -c "):
            with run_lock(run):
                pass
    finally:
        other.kill()
        other.wait()
    with run_lock(run):  # released by the holder's death: taken again at once
        pass
    assert not holder_path(run).exists()  # a holder that ends normally leaves no sidecar (the lock file itself is unlocked)


def test_a_locked_run_refuses_train_resume_and_overwrite_with_one_line(tiny_run, tmp_path):
    run = tmp_path / "run"
    import shutil

    shutil.copytree(tiny_run, run)
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    other = hold_lock(run)
    try:
        for extra in ([], ["--resume"], ["--overwrite"]):
            result = invoke("train", "--preset", "tiny", "--out", run, "--device", "cpu", *extra)
            assert_one_line_error(result, str(run), "being written by another process", f"PID {other.pid}")
    finally:
        other.kill()
        other.wait()
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before  # nothing written, nothing moved aside


# ---------------------------------------------------------------- real processes


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    from diffutext.data.tasks import embedded_pairs

    folder = tmp_path_factory.mktemp("one-writer") / "task"
    folder.mkdir()
    for split, n in (("train", 200), ("valid", 24), ("test", 24)):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in embedded_pairs("bible-basic", split)[:n]))
    return folder


@pytest.mark.slow
def test_two_trains_on_one_folder_the_second_exits_2_naming_the_holder(task, tmp_path):
    run = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--task", task, "--max-steps", 600, "--save-every", 100, "--out", run, "--device", "cpu"]
    first = subprocess.Popen(cli(*args), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (run / "log.jsonl").is_file(), what="the first run's log")
        second = subprocess.run(cli(*args, "--resume"), env=ENV, capture_output=True, text=True, timeout=120)
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert second.returncode == 2 and len(lines) == 1, second.stderr
        assert f"PID {first.pid}" in lines[0] and "being written" in lines[0], second.stderr
        assert first.poll() is None, "the first run ended before the second was refused: give it more steps"
        for extra in ([], ["--overwrite"]):  # the same refusal in process (no interpreter start-up each)
            assert_one_line_error(invoke(*args, *extra), f"PID {first.pid}")
        # readers are allowed while it trains: they read the newest complete checkpoint
        wait_for(lambda: any((run / "checkpoints").glob("step-*/manifest.json")), what="a first checkpoint")
        reader = subprocess.run(
            cli("sample", "--checkpoint", run, "--steps", 4, "--limit", 4, "--show", 0, "--device", "cpu"),
            env=ENV,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert reader.returncode == 0, reader.stderr
        assert first.wait(timeout=900) == 0, first.stderr.read()
    finally:
        first.kill()
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]  # training records (validation ones hold valid_loss)
    assert len(steps) == len(set(steps)) and steps[-1] == 600
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"step-{s:08d}" for s in range(100, 601, 100)]


@pytest.mark.slow
def test_a_sigkilled_holder_leaves_no_stale_lock(task, tmp_path):
    run = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--task", task, "--max-steps", 400, "--save-every", 10, "--out", run, "--device", "cpu"]
    first = subprocess.Popen(cli(*args), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(
        lambda: any((run / "checkpoints").glob("step-*/manifest.json")) if (run / "checkpoints").is_dir() else False,
        what="a first checkpoint",
    )
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert f"PID {first.pid}" in holder(run)  # the file is left naming the dead holder, but nobody holds the lock
    resumed = subprocess.run(
        cli(*args[:5], "--max-steps", 40, "--save-every", 10, "--out", run, "--resume", "--device", "cpu"),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert resumed.returncode == 0, resumed.stderr


@pytest.fixture(scope="module")
def trained(task, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("trained") / "run"
    result = invoke("train", "--preset", "tiny", "--task", task, "--max-steps", 20, "--out", run, "--device", "cpu")
    assert result.exit_code == 0, result.output
    return run


def kill_after(args: list[object], files: Path, count: int) -> None:
    """Start `diffutext ARGS`, SIGKILL it once `count` finished pieces stand in `files`."""
    proc = subprocess.Popen(cli(*args), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(list(files.glob("*.json"))) >= count if files.is_dir() else False, what="finished pieces")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.mark.slow
def test_a_killed_ablate_keeps_its_finished_cells_and_the_rerun_reuses_them(trained, tmp_path):
    args = [
        "ablate",
        "--checkpoint",
        trained,
        "--sampler",
        "uniform,ddim,ads",
        "--steps",
        "8,4",
        "--limit",
        24,
        "--batch-size",
        8,
        "--device",
        "cpu",
    ]
    whole = subprocess.run(cli(*args, "--out", tmp_path / "whole"), env=ENV, capture_output=True, text=True, timeout=900)
    assert whole.returncode == 0, whole.stderr
    cut = tmp_path / "cut"
    kill_after([*args, "--out", cut], cut / ".cells.partial", 2)
    kept = len(list((cut / ".cells.partial").glob("*.json")))
    assert 2 <= kept < 6 and not (cut / "results.json").exists()
    rerun = subprocess.run(cli(*args, "--out", cut), env=ENV, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr
    assert f"reused {kept} of 6 cells" in rerun.stderr
    a, b = (json.loads((d / "results.json").read_text()) for d in (tmp_path / "whole", cut))
    assert without_timing(a["rows"]) == without_timing(b["rows"]) and not (cut / ".cells.partial").exists()


@pytest.mark.slow
def test_a_killed_sample_with_seeds_keeps_its_batches_and_writes_the_same_file(trained, tmp_path):
    args = [
        "sample",
        "--checkpoint",
        trained,
        "--split",
        "test",
        "--steps",
        10,
        "--seeds",
        3,
        "--batch-size",
        4,
        "--show",
        0,
        "--device",
        "cpu",
    ]
    whole = subprocess.run(cli(*args, "--out", tmp_path / "whole.jsonl"), env=ENV, capture_output=True, text=True, timeout=900)
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "cut.jsonl"
    partial = tmp_path / ".cut.jsonl.partial"
    kill_after([*args, "--out", out], partial, 2)
    assert not out.exists() and 2 <= len(list(partial.glob("*.json"))) < 6  # 24 inputs in batches of 4
    rerun = subprocess.run(cli(*args, "--out", out), env=ENV, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr
    assert out.read_text() == (tmp_path / "whole.jsonl").read_text() and not partial.exists()


# ---------------------------------------------------------------- the stores, in process


def test_a_decode_reuses_only_batches_of_the_same_checkpoint_config_and_inputs(trained, tmp_path):
    from dataclasses import replace

    from diffutext import evaluate
    from diffutext.config import SampleConfig
    from diffutext.data.tasks import load_eval_split

    loaded = evaluate.load_model(trained)
    ds = load_eval_split(loaded.checkpoint.config.train.task, "test")
    cfg = SampleConfig(steps=4, batch_size=8)
    keep = Pieces(tmp_path / "pieces")
    first = evaluate.decode(loaded, ds, cfg, keep=keep)
    stored = sorted(keep.folder.glob("*.json"))
    assert len(stored) == 3
    calls = []
    real = evaluate.generate
    evaluate.generate = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        again = evaluate.decode(loaded, ds, cfg, keep=keep)  # everything reused
        assert calls == [] and again.hyps == first.hyps and again.candidates == first.candidates
        evaluate.decode(loaded, ds, replace(cfg, seed=1), keep=keep)  # another option: every batch decoded anew
        assert len(calls) == 3
    finally:
        evaluate.generate = real
    assert len(list(keep.folder.glob("*.json"))) == 6


def test_a_torn_piece_counts_as_not_done(tmp_path):
    keep = Pieces(tmp_path)
    keep.put(fingerprint("a", 1), {"x": [1, 2]})
    assert keep.get(fingerprint("a", 1)) == {"x": [1, 2]} and keep.get(fingerprint("a", 2)) is None
    (tmp_path / f"{fingerprint('a', 1)}.json").write_text('{"value": [1, ')
    assert keep.get(fingerprint("a", 1)) is None


def test_an_interrupted_decode_prints_the_command_that_continues(trained, tmp_path, monkeypatch):
    from diffutext import interrupt

    monkeypatch.setattr(interrupt.StopSignals, "requested", lambda self: True)  # as if SIGTERM came during the first batch
    monkeypatch.setattr(interrupt.StopSignals, "name", property(lambda self: "SIGTERM"))
    monkeypatch.setattr(interrupt.StopSignals, "exit_code", property(lambda self: 143))
    out = tmp_path / "preds.jsonl"
    result = invoke("sample", "--checkpoint", trained, "--steps", 4, "--batch-size", 8, "--out", out, "--device", "cpu")
    assert result.exit_code == 143 and "continue with: diffutext" in result.stderr and "kept in" in result.stderr
    assert not out.exists() and len(list((tmp_path / ".preds.jsonl.partial").glob("*.json"))) == 1
