"""Finished pieces of long decodes and grids, kept on disk so that an interrupted command continues
where it stopped instead of starting over.

A `Pieces` folder holds one JSON file per finished piece (a batch of a decode, a cell of an
ablation), each written atomically the moment it is done, under a key that hashes everything the
piece's result depends on (`fingerprint`: the checkpoint's manifest, the full sample config, the
inputs). A changed checkpoint or option therefore gives new keys and is recomputed, never reused; a
torn or unreadable file counts as not done. The command removes the folder once its whole output is
written.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from .atomic import atomic_write


def fingerprint(*parts: Any) -> str:
    """A stable hash of JSON-able parts (dataclasses as their dicts)."""
    text = json.dumps(parts, sort_keys=True, default=lambda o: getattr(o, "__dict__", str(o)))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


class Pieces:
    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def get(self, key: str) -> Any | None:
        try:
            return json.loads((self.folder / f"{key}.json").read_text(encoding="utf-8"))["value"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, key: str, value: Any) -> None:
        """Keep a finished piece. One that cannot be written (a full disk) is simply not kept: the work goes on,
        and the output's own write reports the disk."""
        try:
            atomic_write(self.folder / f"{key}.json", json.dumps({"value": value}, ensure_ascii=False).encode("utf-8"))
        except OSError:
            try:
                self.folder.rmdir()  # leave no empty folder behind
            except OSError:
                pass

    def sub(self, name: str) -> Pieces:
        """A store inside this one (removed with it): the batches of an ablation's cells, say."""
        return Pieces(self.folder / name)

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
