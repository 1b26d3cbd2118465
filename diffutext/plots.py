"""PNG plots for `ablate` (matplotlib, Agg backend): quality against steps, and where each sampler
spends its steps on the noise-level axis σ_t (method.md §4: ADS puts most steps at high noise).
Each function returns PNG bytes; the caller decides where (and how atomically) to write them."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig, plt) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def quality_vs_steps(rows: Sequence[dict[str, Any]], metric: str, label: str) -> bytes:
    """One line per (checkpoint, sampler): metric against visited steps, log-scaled x."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for r in rows:
        series.setdefault((r["checkpoint"], r["sampler"]), []).append((r["steps"], r[metric]))
    multi = len({c for c, _ in series}) > 1
    for (ckpt, sampler), pts in sorted(series.items()):
        pts.sort()
        xs, ys = zip(*pts)
        name = f"{ckpt}: {sampler}" if multi else sampler
        ax.plot(xs, ys, marker="o" if len(pts) > 1 else "*", markersize=6 if len(pts) > 1 else 12, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("visited timesteps (log scale)")
    ax.set_ylabel(label)
    ax.set_title(f"{label} against sampling steps")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig, plt)


def visited_timesteps(cells: Sequence[dict[str, Any]], sigma: Sequence[float]) -> bytes:
    """For each sampler × steps, a row of dots at the noise levels σ_t it visits."""
    plt = _pyplot()
    unique: dict[tuple[str, int], list[int]] = {}
    for c in cells:
        if c["sampler"] != "ddpm":
            unique.setdefault((c["sampler"], c["steps"]), c["timesteps"])
    keys = sorted(unique, key=lambda k: (k[0], -k[1]))
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(keys) + 1.5))
    for i, key in enumerate(keys):
        ax.scatter([sigma[t] for t in unique[key]], [i] * len(unique[key]), s=14)
    ax.set_yticks(range(len(keys)), [f"{s} × {n}" for s, n in keys], fontsize=8)
    ax.set_xlabel("noise level σ_t = sqrt(1 − ᾱ_t)")
    ax.set_xlim(0, 1.02)
    ax.set_title("timesteps visited by each sampler")
    ax.grid(True, axis="x", alpha=0.3)
    return _png(fig, plt)
