"""Run folders and checkpoints: full state, written atomically, loaded without unpickling code.

runs/<name>/
  config.json            every config and the package version
  tokenizer.json
  log.jsonl              one line per logged step
  checkpoints/step-<N>/  model.safetensors, ema.safetensors (weights only),
                         state.pt (optimizer, RNG, step, data position; loaded with weights_only=True),
                         manifest.json (sha256 of each file and of tokenizer.json, written last)

A checkpoint is built in a hidden folder `checkpoints/.step-<N>.<random>.partial/`: every file is
written to a temporary name, flushed, fsynced and renamed, the manifest last, and only then is the
folder renamed to `step-<N>` (and the parent folder fsynced). A killed process or a full disk
therefore leaves either the whole checkpoint or a hidden leftover that is never listed and is
removed by the next save. A checkpoint without a valid manifest is never loaded, every file is
checked against its sha256 before use, and `--keep K` retires old checkpoints by renaming them
out of sight before deleting them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from . import __version__
from .atomic import atomic_write, fsync_dir
from .config import ConfigError, RunConfig, Weights, choices, validate
from .data.tokenizer import TokenizerError, Vocab, from_str

CHECKPOINTS = "checkpoints"
WEIGHT_FILES = ("model.safetensors", "ema.safetensors")


class CheckpointError(ValueError):
    """A run folder or checkpoint that cannot be used; the message names the file and the problem."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, I/O error); the previous checkpoints are untouched."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- writing ----


def init_run(run_dir: Path, config: RunConfig, vocab: Vocab) -> None:
    atomic_write(run_dir / "config.json", json.dumps({"version": __version__, **config.to_dict()}, indent=2).encode())
    atomic_write(run_dir / "tokenizer.json", vocab.to_str().encode())


def save_checkpoint(
    run_dir: Path, step: int, model_state: dict[str, torch.Tensor], ema_state: dict[str, torch.Tensor], state: dict[str, Any], keep: int = 0
) -> Path:
    """Write checkpoints/step-<step>/ (built hidden, manifest last, then renamed); keep only the newest `keep` (0: all)."""
    root = Path(run_dir) / CHECKPOINTS
    folder = root / f"step-{step:08d}"
    files = {
        "model.safetensors": st_save({k: v.detach().contiguous().cpu() for k, v in model_state.items()}),
        "ema.safetensors": st_save({k: v.detach().contiguous().cpu() for k, v in ema_state.items()}),
        "state.pt": _torch_bytes(state),
    }
    manifest: dict[str, Any] = {"step": step, "version": __version__, "files": {n: _sha256(d) for n, d in files.items()}}
    tok_path = Path(run_dir) / "tokenizer.json"
    if tok_path.is_file():
        manifest["tokenizer_sha256"] = _sha256(tok_path.read_bytes())
    partial = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(root)
        partial = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=root))
        for name, data in files.items():
            atomic_write(partial / name, data)
        atomic_write(partial / "manifest.json", json.dumps(manifest, indent=2).encode())  # the commit mark, last
        if folder.exists():  # a step written again after a resume: retire the old folder out of sight first
            _retire(folder)
        os.rename(partial, folder)
        fsync_dir(root)
    except BaseException as e:
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, CheckpointWriteError):
            raise CheckpointWriteError(
                e.errno, f"cannot write checkpoint {folder.name} ({e.strerror or e}); the previous checkpoints are kept", str(run_dir)
            ) from e
        raise
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            _retire(old)
    return folder


def _retire(folder: Path) -> None:
    """Remove a checkpoint folder so that it is never seen half deleted: rename it hidden, then delete."""
    hidden = folder.with_name(f".{folder.name}.{os.getpid()}.{time.monotonic_ns()}.old")
    os.rename(folder, hidden)
    fsync_dir(folder.parent)
    shutil.rmtree(hidden, ignore_errors=True)


def _remove_leftovers(root: Path) -> None:
    """Hidden folders of saves that were killed (or of deletions that were) before they finished."""
    for p in root.iterdir():
        if p.name.startswith(".step-") and p.name.endswith((".partial", ".old")) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@contextmanager
def replacing(run_dir: Path, notify: Callable[[str], None] | None = None) -> Iterator[Callable[[], None]]:
    """`--overwrite`: move an existing run folder aside to a hidden sibling for the life of the block. The
    block calls the function it is given once the new run has a checkpoint, and the old run is deleted; if
    the block ends before that (a failure, an interrupt), the new folder is removed and the old one put back."""
    run_dir = Path(run_dir)
    aside = None
    if run_dir.exists() and not (run_dir.is_dir() and not any(run_dir.iterdir())):
        if not run_dir.is_dir() or not (run_dir / "config.json").is_file():
            raise CheckpointError(f"--overwrite: {run_dir} is not a diffutext run folder (no config.json); refusing to replace it")
        aside = run_dir.with_name(f".{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        os.rename(run_dir, aside)
        if notify is not None:
            notify(f"--overwrite: moved {run_dir} aside to {aside}; it is deleted once the new run writes its first checkpoint")

    def committed() -> None:
        if aside is not None and aside.exists():
            shutil.rmtree(aside, ignore_errors=True)

    try:
        yield committed
    finally:
        if aside is not None and aside.exists():  # the new run ended before its first checkpoint: put the old one back
            shutil.rmtree(run_dir, ignore_errors=True)
            os.rename(aside, run_dir)


def append_log(run_dir: Path, record: dict[str, Any]) -> None:
    with open(Path(run_dir) / "log.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def truncate_log(run_dir: Path, step: int) -> int:
    """On resume from `step`: keep only whole log records of steps <= step (a kill may leave a torn last
    line, and the steps after the checkpoint are about to be trained again). Returns the records dropped."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
            ok = isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step
        except json.JSONDecodeError:
            ok = False
        if ok:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        atomic_write(path, "".join(line + "\n" for line in kept).encode("utf-8"))
    return dropped


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

    def weights(self, which: Weights = "ema") -> dict[str, torch.Tensor]:
        if which not in choices(Weights):
            raise CheckpointError(f"unknown weights {which!r}; expected {', '.join(choices(Weights))}")
        return self._read_weights(f"{which}.safetensors")

    def state(self) -> dict[str, Any]:
        """Optimizer/RNG/step state, checked against the manifest and unpickled with weights_only=True
        (tensors and plain containers only: a pickle that names any other callable is refused, not run)."""
        path = self.folder / "state.pt"
        data = self._verified(path)
        try:
            state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        except Exception as e:  # the unpickler rejects anything but tensors and plain containers
            raise CheckpointError(f"{path}: refused to load ({str(e).splitlines()[0][:160]})") from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: expected a dict of training state, got {type(state).__name__}")
        return state

    def _read_weights(self, name: str) -> dict[str, torch.Tensor]:
        path = self.folder / name
        data = self._verified(path)
        try:
            return st_load(data)
        except (SafetensorError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None

    def _verified(self, path: Path) -> bytes:
        """The file's bytes, after checking their sha256 against the manifest."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise CheckpointError(f"{path}: missing from the checkpoint") from None
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
        if self.manifest["files"].get(path.name) != _sha256(data):
            raise CheckpointError(f"{path}: checksum does not match manifest.json (corrupted, truncated or replaced file)")
        return data

    @property
    def manifest(self) -> dict[str, Any]:
        return _read_json(self.folder / "manifest.json")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a folder, expected a JSON file") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return obj


def read_config(run_dir: Path) -> RunConfig:
    """The run's config.json, validated; CheckpointError naming the file otherwise."""
    path = Path(run_dir) / "config.json"
    try:
        config = RunConfig.from_dict(_read_json(path))
        validate(config)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if config.model.vocab_size < 1:
        raise CheckpointError(f"{path}: model.vocab_size is not set")
    return config


def locate(path: Path, step: int | None = None) -> tuple[Path, int | None]:
    """(run folder, step) of a `--checkpoint`: a run folder (its newest checkpoint, or the one of `step`), or one of
    its checkpoint folders, RUN/checkpoints/step-N."""
    path = Path(path)
    if path.parent.name != CHECKPOINTS or not path.name.startswith("step-"):
        return path, step
    try:
        n = int(path.name[len("step-") :])
    except ValueError:
        raise CheckpointError(f"{path}: not a checkpoint folder name (expected step-<N>)") from None
    if step is not None and step != n:
        raise CheckpointError(f"--step {step} and --checkpoint {path} name different checkpoints; give one of them")
    return path.parent.parent, n  # step-100 finds step-00000100 too


def open_run(run_dir: Path, step: int | None = None) -> Checkpoint:
    """The newest (or given) valid checkpoint of a run folder, with its config and tokenizer."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: run folder not found")
    config = read_config(run_dir)
    tok_path = run_dir / "tokenizer.json"
    try:
        tok_bytes = tok_path.read_bytes()
        vocab = from_str(tok_bytes.decode("utf-8"), str(tok_path))
    except FileNotFoundError:
        raise CheckpointError(f"{tok_path}: file not found") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{tok_path}: not valid UTF-8 (byte {e.start})") from None
    except OSError as e:
        raise CheckpointError(f"{tok_path}: cannot read ({e.strerror})") from None
    except TokenizerError as e:
        raise CheckpointError(str(e)) from None
    if vocab.size != config.model.vocab_size:
        raise CheckpointError(f"{tok_path}: tokenizer has {vocab.size} entries but the model was built for {config.model.vocab_size}")
    ckpts = list_checkpoints(run_dir)
    if step is not None:
        ckpts = [c for c in ckpts if c.name == f"step-{step:08d}"]
    if not ckpts:
        steps = ", ".join(str(int(c.name[5:])) for c in list_checkpoints(run_dir)) if step is not None else ""
        raise CheckpointError(
            f"{run_dir}: no complete checkpoint{'' if step is None else f' at step {step}'} (missing manifest.json)"
            + (f"; its checkpoints: steps {steps}" if steps else "")
        )
    folder = ckpts[-1]
    manifest = _read_json(folder / "manifest.json")
    files = manifest.get("files")
    if (
        not isinstance(files, dict)
        or not isinstance(manifest.get("step"), int)
        or isinstance(manifest["step"], bool)
        or not set(WEIGHT_FILES + ("state.pt",)) <= set(files)
        or not all(isinstance(v, str) for v in files.values())
    ):
        raise CheckpointError(f"{folder / 'manifest.json'}: malformed manifest (expected step and a sha256 for each file)")
    if folder.name != f"step-{manifest['step']:08d}":
        raise CheckpointError(f"{folder / 'manifest.json'}: says step {manifest['step']} but lies in {folder.name}")
    expected_tok = manifest.get("tokenizer_sha256")
    if expected_tok is not None and expected_tok != _sha256(tok_bytes):
        raise CheckpointError(
            f"{tok_path}: not the tokenizer this checkpoint was trained with (sha256 differs from {folder.name}/manifest.json)"
        )
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
