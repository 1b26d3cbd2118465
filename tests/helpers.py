"""Helpers shared by the test modules: the CLI runner, `invoke`, the one-line-error check, and the
tools of the checkpoint tests (run copies, the newest checkpoint folder, resealing a tampered file,
a pickle payload that must never run)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from diffutext.cli import app

runner = CliRunner()


def invoke(*args):
    """Run `diffutext ARGS...` in process (every argument turned into a string)."""
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *needles: str, code: int = 2, alone: bool = True) -> str:
    """Exit `code`, no traceback, exactly one `error:` line on stderr and it is the last line there; every
    needle is in it. `alone`: nothing else was printed at all (stdout or stderr), as for input refused
    before any work starts; pass alone=False where a run first printed progress. Returns the line."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output, result.output
    if result.exception is not None:
        assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    if alone:
        assert [line for line in result.output.splitlines() if line.strip()] == errors, result.output
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def newest_folder(run: Path) -> Path:
    return sorted(p for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))[-1]


def reseal(folder: Path, name: str) -> None:
    """Rewrite the manifest's checksum of `name` so that a replaced file passes the checksum check
    (what someone who hands out a tampered checkpoint would do)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))


class Evil:
    """A pickle payload that creates a file when unpickled (it must never be)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))
