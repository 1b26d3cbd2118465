"""One writer per run folder.

`run_lock(run_dir)` holds a `filelock.FileLock` on a hidden sibling file, `.NAME.lock` next to the run
folder (beside it, not inside, so that it also guards a folder that does not exist yet and one that
`--overwrite` moves aside). A sidecar, `.NAME.lock.holder`, names the holder (PID, host and command)
and is removed when the holder is done (the lock file stays, unlocked); the operating system releases the lock itself when the holder
exits, however it exits, so a SIGKILLed run never leaves a stale lock (only a sidecar naming the dead
holder, which the next writer replaces). A second writer gets `RunLocked` at once, naming the holder.
Within one process the lock is reentrant (the CLI takes it before `--overwrite` moves anything; the
engine's `train` takes it again). Readers (`sample`, `evaluate`, `ablate`) take no lock: they read the
newest complete checkpoint, which checkpoints' atomic layout guarantees.
"""

from __future__ import annotations

import os
import shlex
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout


class RunLocked(ValueError):
    """The run folder has another writer; the message names it."""


def lock_path(run_dir: Path) -> Path:
    run_dir = Path(os.path.abspath(run_dir))
    return run_dir.with_name(f".{run_dir.name}.lock")


def holder_path(run_dir: Path) -> Path:
    path = lock_path(run_dir)
    return path.with_name(path.name + ".holder")


def holder(run_dir: Path) -> str:
    """Who holds (or last held) the lock, as its sidecar says."""
    try:
        return holder_path(run_dir).read_text(encoding="utf-8").strip() or "unknown"
    except OSError:
        return "unknown"


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run folder's writer lock for the block; RunLocked if another process holds it."""
    path = lock_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path, timeout=0, is_singleton=True)  # one object per path in this process: reentrant
    try:
        lock.acquire()
    except Timeout:
        raise RunLocked(
            f"{run_dir} is being written by another process ({holder(run_dir)}); "
            "wait for it to end or stop it (its lock is released when it exits)"
        ) from None
    outer = lock.lock_counter == 1
    try:
        if outer:
            command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "python"
            holder_path(run_dir).write_text(f"PID {os.getpid()} on host {socket.gethostname()}: {command}\n", encoding="utf-8")
        yield
    finally:
        if outer:
            try:
                holder_path(run_dir).unlink()
            except OSError:
                pass
        lock.release()
