"""The Python API: a trained run as an object that turns sources into text.

    import diffutext
    model = diffutext.load("runs/bible-basic-small-…")       # a run folder, or one of its checkpoint folders
    model.generate(["And God said, Let there be light."], sampler="ads", steps=20)

`generate` takes any field of `SampleConfig` as a keyword (sampler, steps, seeds, cedi, length, …) and returns one
string per source, the same strings `diffutext sample` writes for the same settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from .config import SampleConfig


class Model:
    """A loaded run: its denoiser, tokenizer and config (`evaluate.Loaded`), and a `generate` over lists of strings."""

    def __init__(self, loaded, weights: str = "ema"):
        self.loaded, self.weights = loaded, weights

    @property
    def config(self):
        return self.loaded.checkpoint.config

    def generate(self, sources: Sequence[str], **options: Any) -> list[str]:
        """One output per source, decoded with the SampleConfig fields given as keywords (the defaults otherwise)."""
        from .data.jsonl import Rows
        from .data.tasks import eval_dataset
        from .evaluate import decode

        if isinstance(sources, str):
            raise TypeError("generate takes a list of source strings; wrap a single one in a list")
        known = {f.name for f in fields(SampleConfig)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        cfg = replace(SampleConfig(weights=self.weights), **options)
        if cfg.weights != self.weights:
            raise ValueError(f"this model was loaded with its {self.weights} weights; load it again with weights={cfg.weights!r}")
        if not sources:
            return []
        dataset = eval_dataset(Rows(list(sources), [[] for _ in sources]))
        return decode(self.loaded, dataset, cfg).hyps

    def __repr__(self) -> str:
        return f"diffutext.Model({str(self.loaded.checkpoint.folder)!r}, step {self.loaded.checkpoint.step})"


def load(run: str | Path, weights: str = "ema", device: str = "auto", step: int | None = None) -> Model:
    """A run folder (its newest checkpoint, or that of `step`) or one checkpoint folder, ready to `generate`."""
    from .device import resolve_device
    from .evaluate import load_model

    return Model(load_model(Path(run), weights, resolve_device(device), step), weights)
