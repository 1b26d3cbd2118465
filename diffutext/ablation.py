"""Ablation: checkpoints × samplers × steps on the same inputs, scored and timed (method.md §4–§5).

`grid` builds the cells (ddpm once at the full T, every other sampler at each step count);
`run` decodes and scores every cell of every checkpoint; `best` marks the best value of each
column per checkpoint; `write` saves results.csv, results.json (with each cell's visited
timesteps) and the PNG plots. A "copy the source" row is scored beside the samplers so every
number has its floor in view, and for a model with the copy prior's lexicon a "lexicon lookup" row (the
source written through the lexicon, what the prior alone writes).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import metrics
from .atomic import atomic_write
from .config import SampleConfig
from .data.tasks import references
from .device import resolve_precision
from .evaluate import Loaded, decode, identity, scores
from .lexicon import translate
from .pieces import Pieces, fingerprint
from .samplers import make_sampler

Callback = Callable[[str, dict[str, Any]], None]

FLOORS = ("copy source", "lexicon lookup")  # rows scored beside the samplers, not decoded
# column -> whether higher is better (None: no "best")
COLUMNS = {
    "sacrebleu": True,
    "sentence_bleu": True,
    "diffuseq_bleu": True,
    "rouge_l": True,
    "dist_1": True,
    "self_bleu": False,
    "avg_len": None,
    "seconds": False,
    "sentences_per_s": True,
    "speedup": True,
}


def grid(samplers: list[str], steps: list[int], T: int, base: SampleConfig) -> list[tuple[str, int]]:
    """The (sampler, steps) cells: ddpm once at the full T, every other sampler at each step count. A cell that
    cannot run (too many steps for T, say) raises SamplerError here, before any time is spent."""
    cells = []
    for name in samplers:
        cells += [(name, T)] if name == "ddpm" else [(name, n) for n in steps]
    for name, n in cells:
        make_sampler(name, base.update, base.variance, base.eta, base.ads_shares).timesteps(T, n)
    return cells


def run(
    checkpoints: list[tuple[str, Loaded]],
    dataset,
    cells: list[tuple[str, int]],
    base: SampleConfig,
    callback: Callback | None = None,
    keep: Pieces | None = None,
) -> list[dict[str, Any]]:
    """One row per checkpoint × cell, plus a copy-the-source row per checkpoint. With `keep`, each finished cell is
    stored as it completes, and a cell stored by an earlier (interrupted) run of the same grid is reused: the
    "cell_reused" event says so."""
    emit = callback or (lambda event, info: None)
    refs = references(dataset)
    rows: list[dict[str, Any]] = []
    copy = metrics.score(list(dataset["src"]), refs)
    for label, loaded in checkpoints:
        ckpt_rows = []
        for name, steps in cells:
            cfg = replace(base, sampler=name, steps=steps)
            key = fingerprint(identity(loaded, cfg, resolve_precision(cfg.precision, loaded.device), list(dataset["src"])), refs)
            row = keep.get(key) if keep is not None else None
            if row is not None:
                emit("cell_reused", {"checkpoint": label, "sampler": name, "steps": steps})
            else:
                emit("cell", {"checkpoint": label, "sampler": name, "steps": steps})
                out = decode(loaded, dataset, cfg, callback, keep and keep.sub("batches"))  # a stop mid-cell loses no batch
                row = {
                    "step": loaded.checkpoint.step,
                    "sampler": name,
                    "steps": out.steps,
                    **scores(out, refs, cfg.seeds),
                    "timesteps": out.timesteps,
                }
                if keep is not None:
                    keep.put(key, row)
            row = {"checkpoint": label, **row}
            ckpt_rows.append(row)
            emit("cell_done", {"row": row})
        full = next((r for r in ckpt_rows if r["sampler"] == "ddpm"), None)
        for r in ckpt_rows:
            r["speedup"] = full["seconds"] / r["seconds"] if full is not None and r["seconds"] > 0 else None
        rows += ckpt_rows
        floors = {"copy source": copy}
        if hasattr(loaded.model, "lexicon"):
            floors["lexicon lookup"] = metrics.score(translate(list(dataset["src"]), loaded.checkpoint.vocab, loaded.model.lexicon), refs)
        rows += [
            {
                "checkpoint": label,
                "step": loaded.checkpoint.step,
                "sampler": name,
                "steps": 0,
                **floor,
                "seconds": 0.0,
                "sentences_per_s": None,
                "speedup": None,
                "timesteps": [],
            }
            for name, floor in floors.items()
        ]
    return rows


def best(rows: list[dict[str, Any]]) -> set[tuple[int, str]]:
    """(row index, column) of the best value of each column within each checkpoint (samplers only)."""
    marks = set()
    for label in dict.fromkeys(r["checkpoint"] for r in rows):
        idx = [i for i, r in enumerate(rows) if r["checkpoint"] == label and r["sampler"] not in FLOORS]
        for col, higher in COLUMNS.items():
            vals = [(rows[i].get(col), i) for i in idx if rows[i].get(col) is not None]
            if higher is None or len(vals) < 2:
                continue
            target = max(v for v, _ in vals) if higher else min(v for v, _ in vals)
            marks |= {(i, col) for v, i in vals if v == target}
    return marks


def write(out_dir: Path, rows: list[dict[str, Any]], sigma: list[float], meta: dict[str, Any]) -> list[Path]:
    """results.csv, results.json and two PNG plots under out_dir; returns the paths written."""
    from . import plots

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fields = [
        "checkpoint",
        "step",
        "sampler",
        "steps",
        "sacrebleu",
        "sentence_bleu",
        "diffuseq_bleu",
        "rouge_l",
        "dist_1",
        "avg_len",
        "self_bleu",
        "div_4",
        "count",
        "seconds",
        "sentences_per_s",
        "speedup",
    ]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(out_dir / "results.csv", buf.getvalue().encode())
    atomic_write(out_dir / "results.json", (json.dumps({**meta, "rows": rows}, indent=2) + "\n").encode())
    samplers = [r for r in rows if r["sampler"] not in FLOORS]
    paths = [out_dir / "results.csv", out_dir / "results.json"]
    pngs = {
        f"{metric}_vs_steps.png": plots.quality_vs_steps(samplers, metric, label)
        for metric, label in (("sacrebleu", "sacreBLEU (corpus)"), ("sentence_bleu", "sentence BLEU-4 (textbook, nltk)"))
    }
    pngs["timesteps.png"] = plots.visited_timesteps(samplers, sigma)
    for name, data in pngs.items():
        atomic_write(out_dir / name, data)
        paths.append(out_dir / name)
    return paths
