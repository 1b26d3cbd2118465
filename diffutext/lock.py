"""One writer per run folder.

`run_lock(run_dir)` holds an exclusive `flock` on a hidden sibling file, `.NAME.lock` next to the
run folder (beside it, not inside, so that it also guards a folder that does not exist yet and one
that `--overwrite` moves aside). The file names its holder (PID and host) and is removed when the
holder is done; the operating system releases the lock when the holder exits, however it exits, so
a SIGKILLed run never leaves a stale lock (only an unlocked file, which the next writer takes). A second writer gets `RunLocked` at once, naming the holder. Within one process the lock is
reentrant (the CLI takes it before `--overwrite` moves anything; the engine's `train` takes it
again). Readers (`sample`, `evaluate`, `ablate`) take no lock: they read the newest complete
checkpoint, which checkpoints' atomic layout guarantees.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_HELD: dict[str, int] = {}  # lock files this process holds, with their depth


class RunLocked(ValueError):
    """The run folder has another writer; the message names it."""


def lock_path(run_dir: Path) -> Path:
    run_dir = Path(os.path.abspath(run_dir))
    return run_dir.with_name(f".{run_dir.name}.lock")


def holder(run_dir: Path) -> str:
    """Who holds (or last held) the lock, as its file says."""
    try:
        return lock_path(run_dir).read_text(encoding="utf-8").strip() or "unknown"
    except OSError:
        return "unknown"


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run folder's writer lock for the block; RunLocked if another process holds it."""
    path = lock_path(run_dir)
    key = str(path)
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunLocked(
                f"{run_dir} is being written by another process ({holder(run_dir)}); "
                "wait for it to end or stop it (its lock is released when it exits)"
            ) from None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break  # the file we locked is still the one at the path
        except FileNotFoundError:
            pass
        os.close(fd)  # its holder removed it as we opened it: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"PID {os.getpid()} on host {socket.gethostname()}\n".encode())
        _HELD[key] = 1
        yield
    finally:
        _HELD.pop(key, None)
        try:
            os.unlink(path)  # still holding it: a process that opened it meanwhile sees the inode change and retries
        except OSError:
            pass
        os.close(fd)  # releases the lock (the OS does the same when the process dies, leaving the file behind)
