"""Run folders and checkpoints: full state, written atomically, loaded without unpickling code.

runs/<name>/
  config.json            every config and the package version
  tokenizer.json
  log.jsonl              one line per logged step
  checkpoints/step-<N>/  model.safetensors, ema.safetensors (weights only),
                         state.pt (optimizer, RNG, step; loaded with weights_only=True),
                         manifest.json (sha256 of each file, written last)

Every file is written to a temporary name, flushed, fsynced and renamed; a checkpoint without a
valid manifest is never loaded, so a killed process never leaves a half checkpoint behind.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from . import __version__
from .config import ConfigError, RunConfig
from .data.tokenizer import TokenizerError, Vocab, from_str

CHECKPOINTS = "checkpoints"
WEIGHT_FILES = ("model.safetensors", "ema.safetensors")


class CheckpointError(ValueError):
    """A run folder or checkpoint that cannot be used; the message names the file and the problem."""


def atomic_write(path: Path, data: bytes) -> None:
    """Write bytes to path so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- writing ----

def init_run(run_dir: Path, config: RunConfig, vocab: Vocab) -> None:
    atomic_write(run_dir / "config.json", json.dumps({"version": __version__, **config.to_dict()}, indent=2).encode())
    atomic_write(run_dir / "tokenizer.json", vocab.to_str().encode())


def save_checkpoint(run_dir: Path, step: int, model_state: dict[str, torch.Tensor], ema_state: dict[str, torch.Tensor],
                    state: dict[str, Any], keep: int = 0) -> Path:
    """Write checkpoints/step-<step>/ (manifest last); keep only the newest `keep` (0: all)."""
    folder = Path(run_dir) / CHECKPOINTS / f"step-{step:08d}"
    files = {
        "model.safetensors": st_save({k: v.detach().contiguous().cpu() for k, v in model_state.items()}),
        "ema.safetensors": st_save({k: v.detach().contiguous().cpu() for k, v in ema_state.items()}),
        "state.pt": _torch_bytes(state),
    }
    (folder / "manifest.json").unlink(missing_ok=True)  # an overwritten checkpoint is invalid until complete
    for name, data in files.items():
        atomic_write(folder / name, data)
    manifest = {"step": step, "version": __version__, "files": {n: _sha256(d) for n, d in files.items()}}
    atomic_write(folder / "manifest.json", json.dumps(manifest, indent=2).encode())
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return folder


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def append_log(run_dir: Path, record: dict[str, Any]) -> None:
    with open(Path(run_dir) / "log.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


# ---- reading ----

def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders with a manifest, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / "manifest.json").is_file())


def newest_run(runs_dir: Path) -> Path:
    """The run under runs_dir whose newest checkpoint was written last."""
    root = Path(runs_dir)
    candidates = []
    if root.is_dir():
        for run in root.iterdir():
            ckpts = list_checkpoints(run) if run.is_dir() else []
            if ckpts:
                candidates.append(((ckpts[-1] / "manifest.json").stat().st_mtime, run))
    if not candidates:
        raise CheckpointError(f"no trained run found under {root}/; train one first (diffutext train) or pass --checkpoint RUN")
    return max(candidates)[1]


@dataclass
class Checkpoint:
    run_dir: Path
    folder: Path
    config: RunConfig
    vocab: Vocab
    step: int

    def weights(self, which: str = "ema") -> dict[str, torch.Tensor]:
        if which not in ("ema", "model"):
            raise CheckpointError(f"unknown weights {which!r}; expected ema or model")
        return self._read_weights(f"{which}.safetensors")

    def state(self) -> dict[str, Any]:
        path = self.folder / "state.pt"
        data = self._verified(path)
        try:
            return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        except Exception as e:  # the unpickler rejects anything but tensors and plain containers
            raise CheckpointError(f"{path}: refused to load ({str(e).splitlines()[0][:160]})") from None

    def _read_weights(self, name: str) -> dict[str, torch.Tensor]:
        path = self.folder / name
        data = self._verified(path)
        try:
            return st_load(data)
        except (SafetensorError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None

    def _verified(self, path: Path) -> bytes:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise CheckpointError(f"{path}: missing from the checkpoint") from None
        expected = self.manifest["files"].get(path.name)
        if expected != _sha256(data):
            raise CheckpointError(f"{path}: checksum does not match manifest.json (corrupted or replaced file)")
        return data

    @property
    def manifest(self) -> dict[str, Any]:
        return _read_json(self.folder / "manifest.json")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return obj


def open_run(run_dir: Path, step: int | None = None) -> Checkpoint:
    """The newest (or given) valid checkpoint of a run folder, with its config and tokenizer."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: run folder not found")
    try:
        config = RunConfig.from_dict(_read_json(run_dir / "config.json"))
    except ConfigError as e:
        raise CheckpointError(f"{run_dir / 'config.json'}: {e}") from None
    tok_path = run_dir / "tokenizer.json"
    try:
        vocab = from_str(tok_path.read_text(encoding="utf-8"), str(tok_path))
    except FileNotFoundError:
        raise CheckpointError(f"{tok_path}: file not found") from None
    except (TokenizerError, UnicodeDecodeError) as e:
        raise CheckpointError(str(e)) from None
    if vocab.size != config.model.vocab_size:
        raise CheckpointError(f"{tok_path}: tokenizer has {vocab.size} entries but the model was built for {config.model.vocab_size}")
    ckpts = list_checkpoints(run_dir)
    if step is not None:
        ckpts = [c for c in ckpts if c.name == f"step-{step:08d}"]
    if not ckpts:
        raise CheckpointError(f"{run_dir}: no complete checkpoint{'' if step is None else f' at step {step}'} (missing manifest.json)")
    folder = ckpts[-1]
    manifest = _read_json(folder / "manifest.json")
    if not isinstance(manifest.get("files"), dict) or not isinstance(manifest.get("step"), int):
        raise CheckpointError(f"{folder / 'manifest.json'}: malformed manifest")
    return Checkpoint(run_dir, folder, config, vocab, manifest["step"])


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], where: str) -> None:
    """Load a state dict, turning shape or key mismatches into one clear line."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{where}: weights do not fit this model (missing {missing[:3]}, unexpected {extra[:3]})")
    for k, v in weights.items():
        if v.shape != expected[k].shape:
            raise CheckpointError(f"{where}: {k} has shape {tuple(v.shape)}, this model needs {tuple(expected[k].shape)}")
    model.load_state_dict(weights)
