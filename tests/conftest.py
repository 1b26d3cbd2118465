"""Shared fixtures: tiny configs, a trained tiny run (built once per session), the shared data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A tiny model trained for 20 steps on bible-basic (seconds)."""
    from diffutext.config import resolve
    from diffutext.train import train

    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    train(resolve("tiny"), run_dir, device="cpu")
    return run_dir


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present on this machine")
    return SHARED_DATA
