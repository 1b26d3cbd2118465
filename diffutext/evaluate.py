"""Decode inputs with a sampler and score the output (PAPER.md §5).

`load_model` opens a run folder (EMA weights by default); `decode` turns a Dataset of sources
into text, K seeds at a time, keeping the per-source MBR pick and the diversity of the K
candidates (self-BLEU, div-4). `ablation.py` runs grids of these.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from . import metrics
from .checkpoint import Checkpoint, load_weights, open_run
from .config import SampleConfig
from .data.batches import pack_split
from .data.tasks import references
from .diffusion import alpha_bar_table
from .model import Denoiser
from .samplers import generate, make_sampler

Callback = Callable[[str, dict[str, Any]], None]


@dataclass
class Loaded:
    checkpoint: Checkpoint
    model: Denoiser
    alpha_bar: torch.Tensor
    device: torch.device


def load_model(run_dir: Path, weights: str = "ema", device: torch.device | str = "cpu") -> Loaded:
    ck = open_run(Path(run_dir))
    model = Denoiser(ck.config.model)
    load_weights(model, ck.weights(weights), str(ck.folder / f"{weights}.safetensors"))
    device = torch.device(device)
    model.to(device).eval()
    alpha_bar = alpha_bar_table(ck.config.diffusion.schedule, ck.config.diffusion.T).to(device)
    return Loaded(ck, model, alpha_bar, device)


@dataclass
class Decoded:
    hyps: list[str]  # the MBR pick per source (the only candidate when K = 1)
    candidates: list[list[str]]  # K candidates per source
    seconds: float  # wall time of the denoising loops (all seeds)
    steps: int  # visited timesteps per decode
    timesteps: list[int]
    diversity: dict[str, float] = field(default_factory=dict)
    truncated: int = 0  # sources cut to fit the model's sequence length


def decode(loaded: Loaded, dataset, cfg: SampleConfig, callback: Callback | None = None) -> Decoded:
    """Decode every source of a Dataset (columns src, trg) cfg.seeds times; keep the MBR pick."""
    emit = callback or (lambda event, info: None)
    ck, model = loaded.checkpoint, loaded.model
    vocab, T = ck.vocab, ck.config.diffusion.T
    sampler = make_sampler(cfg.sampler, cfg.update, cfg.variance, cfg.eta, cfg.ads_shares)
    timesteps = sampler.timesteps(T, cfg.steps).tolist()
    packed = pack_split(dataset, vocab, ck.config.model.seq_len, with_target=False)
    n, bs = len(packed), cfg.batch_size
    per_seed: list[list[str]] = []
    seconds = 0.0
    total = n * cfg.seeds
    done = 0
    for k in range(cfg.seeds):
        generator = torch.Generator(device=loaded.device).manual_seed(cfg.seed + k)
        texts: list[str] = []
        for start in range(0, n, bs):
            ids = packed.ids[start:start + bs].to(loaded.device)
            mask = packed.target_mask[start:start + bs].to(loaded.device)
            t0 = time.perf_counter()
            out = generate(model, loaded.alpha_bar, sampler, cfg.steps, ids, mask, clamp=cfg.clamp, generator=generator)
            out = out.cpu()  # one sync per batch
            seconds += time.perf_counter() - t0
            texts += _to_text(out, mask.cpu(), vocab)
            done += ids.shape[0]
            emit("progress", {"done": done, "total": total})
        per_seed.append(texts)
    candidates = [list(c) for c in zip(*per_seed)]
    if cfg.seeds == 1:
        return Decoded([c[0] for c in candidates], candidates, seconds, len(timesteps), timesteps, truncated=packed.truncated)
    hyps, sb, d4 = [], [], []
    for cands in candidates:
        m = metrics.pairwise_bleu(cands)
        hyps.append(cands[metrics.mbr_pick(cands, m)])
        sb.append(metrics.self_bleu(m))
        d4.append(metrics.div_4(cands))
    diversity = {"self_bleu": sum(sb) / len(sb), "div_4": sum(d4) / len(d4)}
    return Decoded(hyps, candidates, seconds, len(timesteps), timesteps, diversity, truncated=packed.truncated)


def _to_text(ids: torch.Tensor, target_mask: torch.Tensor, vocab) -> list[str]:
    """The target side of each row with every special token ([SEP], [PAD], ...) dropped, as DiffuSeq's
    evaluation does (not cut at the first [SEP]: a stray [SEP] mid-sentence must not end the output)."""
    return vocab.decode([[tok for tok, keep in zip(row, m) if keep] for row, m in zip(ids.tolist(), target_mask.tolist())])
