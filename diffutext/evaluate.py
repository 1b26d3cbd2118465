"""Decode inputs with a sampler and score the output (PAPER.md §5).

`load_model` opens a run folder (EMA weights by default); `decode` turns a Dataset of sources
into text, K seeds at a time, keeping the per-source MBR pick and the diversity of the K
candidates (self-BLEU, div-4). `ablation.py` runs grids of these.

Inputs stream through in batches (packed one batch at a time), so sampling memory does not grow
with their number. Each batch has its own generator, seeded by (seed, batch index): the output
does not depend on how batches are shared out, and under torchrun each rank decodes every
world-th batch and the results are gathered back in input order (no input is decoded twice).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from . import distributed as dist
from . import metrics
from .checkpoint import Checkpoint, load_weights, open_run
from .config import SampleConfig
from .data.batches import pack_one
from .diffusion import alpha_bar_table
from .model import Denoiser
from .samplers import generate, make_sampler, resolve_precision

Callback = Callable[[str, dict[str, Any]], None]


@dataclass
class Loaded:
    checkpoint: Checkpoint
    model: Denoiser
    alpha_bar: torch.Tensor
    device: torch.device


def load_model(run_dir: Path, weights: str = "ema", device: torch.device | str = "cpu") -> Loaded:
    ck = open_run(Path(run_dir))
    ck.state(mmap=True)  # refuse a tampered checkpoint even though decoding needs no optimizer state (nothing is unpickled unsafely)
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
    precision: str = "fp32"  # the denoiser's precision, "auto" resolved
    truncated: int = 0  # sources cut to fit the model's sequence length


def _pack_batch(srcs: list[str], vocab, seq_len: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """[CLS] src [SEP] + an empty target side, padded: ids and target_mask, (B, L) each, and how many
    sources were truncated."""
    ids = torch.full((len(srcs), seq_len), vocab.pad, dtype=torch.long)
    mask = torch.zeros((len(srcs), seq_len), dtype=torch.bool)
    truncated = 0
    for i, src in enumerate(vocab.encode(srcs)):
        seq, sep, cut = pack_one(src, None, seq_len, vocab)
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, sep + 1:] = True
        truncated += cut
    return ids, mask, truncated


def resolve_clamp_by(clamp_by: str, run_config) -> str:
    """"auto": a model trained with the anchor loss snaps by the head's argmax (its x0_hat is trained for the
    head, not to lie near the embedding), any other by the nearest embedding; else the value itself."""
    if clamp_by != "auto":
        return clamp_by
    return "head" if run_config.train.anchor_weight > 0 else "nearest"


def batch_seed(seed: int, batch: int) -> int:
    """The generator seed of one batch: depends on the seed and the batch index only."""
    return seed * 1_000_003 + batch


def decode(loaded: Loaded, dataset, cfg: SampleConfig, callback: Callback | None = None) -> Decoded:
    """Decode every source of a Dataset (columns src, trg) cfg.seeds times; keep the MBR pick.

    Under torchrun, batch b is decoded (and MBR-picked) by rank b mod world and gathered back."""
    emit = (callback or (lambda event, info: None)) if dist.is_main() else (lambda event, info: None)
    ck, model = loaded.checkpoint, loaded.model
    vocab, T, seq_len = ck.vocab, ck.config.diffusion.T, ck.config.model.seq_len
    sampler = make_sampler(cfg.sampler, cfg.update, cfg.variance, cfg.eta, cfg.ads_shares)
    timesteps = sampler.timesteps(T, cfg.steps).tolist()
    n, bs, world, rank = len(dataset), cfg.batch_size, dist.world(), dist.rank()
    total, done, seconds, truncated = n * cfg.seeds, 0, 0.0, 0
    mine: dict[int, tuple[list[str], list[list[str]], list[float], list[float]]] = {}
    generator = torch.Generator(device=loaded.device)
    precision = resolve_precision(cfg.precision, loaded.device)
    clamp_by = resolve_clamp_by(cfg.clamp_by, ck.config)
    for b in range(rank, -(-n // bs), world):
        ids, mask, cut = _pack_batch(dataset[b * bs:(b + 1) * bs]["src"], vocab, seq_len)
        truncated += cut
        ids, mask = ids.to(loaded.device), mask.to(loaded.device)
        per_seed = []
        for k in range(cfg.seeds):
            generator.manual_seed(batch_seed(cfg.seed + k, b))
            t0 = time.perf_counter()
            out = generate(model, loaded.alpha_bar, sampler, cfg.steps, ids, mask, clamp=cfg.clamp, generator=generator,
                           precision=precision, self_condition_input=cfg.self_condition_input, clamp_by=clamp_by)
            out = out.cpu()  # one sync per batch
            seconds += time.perf_counter() - t0
            per_seed.append(_to_text(out, mask.cpu(), vocab))
            done += ids.shape[0]
            emit("progress", {"done": min(done * world, total), "total": total})
        candidates = [list(c) for c in zip(*per_seed)]
        mine[b] = _pick(candidates) if cfg.seeds > 1 else ([c[0] for c in candidates], candidates, [], [])
    parts: dict[int, tuple] = {}
    all_truncated = 0
    for gathered, secs, cut in dist.all_gather_object((mine, seconds, truncated)):
        parts.update(gathered)
        seconds = max(seconds, secs)  # ranks decode side by side: the wall time is the slowest one's
        all_truncated += cut
    hyps, candidates, sb, d4 = [], [], [], []
    for b in sorted(parts):
        hyps += parts[b][0]
        candidates += parts[b][1]
        sb += parts[b][2]
        d4 += parts[b][3]
    diversity = {"self_bleu": sum(sb) / len(sb), "div_4": sum(d4) / len(d4)} if cfg.seeds > 1 and sb else {}
    return Decoded(hyps, candidates, seconds, len(timesteps), timesteps, diversity, precision, all_truncated)


def _pick(candidates: list[list[str]]) -> tuple[list[str], list[list[str]], list[float], list[float]]:
    """Per source: the MBR pick among its K candidates, their self-BLEU and div-4."""
    hyps, sb, d4 = [], [], []
    for cands in candidates:
        m = metrics.pairwise_bleu(cands)
        hyps.append(cands[metrics.mbr_pick(cands, m)])
        sb.append(metrics.self_bleu(m))
        d4.append(metrics.div_4(cands))
    return hyps, candidates, sb, d4


def _to_text(ids: torch.Tensor, target_mask: torch.Tensor, vocab) -> list[str]:
    """The target side of each row with every special token ([SEP], [PAD], ...) dropped, as DiffuSeq's
    evaluation does (not cut at the first [SEP]: a stray [SEP] mid-sentence must not end the output)."""
    return vocab.decode([[tok for tok, keep in zip(row, m) if keep] for row, m in zip(ids.tolist(), target_mask.tolist())])
