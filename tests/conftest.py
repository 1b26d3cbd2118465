"""Shared fixtures: a small real task folder, a trained tiny run (both built once per session), a fresh
copy of that run, the shared data folder; a datasets cache of the session's own. Helpers that are not
fixtures (`invoke`, the one-line-error check, ...) live in helpers.py."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# One thread: the test models are tiny (per-op overhead, not arithmetic), and on a shared 2-core machine
# two OpenMP threads per process spin against each other and the other processes (a 2-step tiny train
# measured 5.4 s with two threads under load, 0.4 s with one). Subprocesses inherit OMP_NUM_THREADS.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SMALL_TASK = {"train": 200, "valid": 16, "test": 16}  # Bible pairs per split of `small_task`


@pytest.fixture(scope="session", autouse=True)
def hf_datasets_cache(tmp_path_factory):
    """Nothing read from or left in the user's datasets cache (subprocesses inherit the variable)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf-datasets-cache")))
        yield


@pytest.fixture(scope="session")
def small_task(tmp_path_factory) -> Path:
    """A DiffuSeq-style folder of the first embedded bible-basic pairs (SMALL_TASK): real text, but packing
    and BPE training take milliseconds, where the whole embedded task takes seconds on every train call."""
    from diffutext.data.tasks import embedded_pairs

    folder = tmp_path_factory.mktemp("task") / "bible-small"
    folder.mkdir()
    for split, n in SMALL_TASK.items():
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in embedded_pairs("bible-basic", split)[:n]))
    return folder


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, small_task) -> Path:
    """A tiny model trained for 20 steps on `small_task` (checkpoints at steps 10 and 20)."""
    from diffutext.config import resolve
    from diffutext.train import train

    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    train(resolve("tiny", {"train": {"task": str(small_task)}}), run_dir, device="cpu")
    return run_dir


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    """A copy of `tiny_run` that a test may damage."""
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present on this machine")
    return SHARED_DATA
