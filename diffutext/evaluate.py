"""Decode inputs with a sampler and score the output (method.md §5).

`load_model` opens a run folder (EMA weights by default); `decode` turns a Dataset of sources
into text, K seeds at a time, keeping the per-source MBR pick and the diversity of the K
candidates (self-BLEU, div-4). `ablation.py` runs grids of these.

Inputs stream through in batches (packed one batch at a time), so sampling memory does not grow
with their number. Each batch has its own generator, seeded by (seed, batch index): the output
does not depend on how batches are shared out, and under torchrun each rank decodes every
world-th batch and the results are gathered back in input order (no input is decoded twice).
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import diffuseq_metrics, metrics
from . import distributed as dist
from .checkpoint import Checkpoint, load_weights, locate, open_run
from .config import SampleConfig
from .data.batches import pack_one
from .device import autocast, resolve_precision
from .diffusion import alpha_bar_table
from .model import Denoiser, build_model, length_range
from .pieces import Pieces, fingerprint
from .samplers import SamplerError, generate, make_sampler

Callback = Callable[[str, dict[str, Any]], None]


@dataclass
class Loaded:
    checkpoint: Checkpoint
    model: Denoiser
    alpha_bar: torch.Tensor
    device: torch.device


def load_model(run_dir: Path, weights: str = "ema", device: torch.device | str = "cpu", step: int | None = None) -> Loaded:
    """A run's denoiser for decoding: its config, tokenizer and one set of weights (state.pt is never read). `run_dir` is a
    run folder (its newest checkpoint, or that of `step`) or one checkpoint folder of it, RUN/checkpoints/step-N."""
    ck = open_run(*locate(Path(run_dir), step))
    model = build_model(ck.config)
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
    cedi: float | None = None  # the condition-enhanced denoiser's share, "auto" resolved (None: off)
    copy_diagonal: float | None = None  # the copy attention's diagonal prior λ (None: no copy attention)


def _pack_batch(srcs: list[str], vocab, seq_len: int, layout: str = "diffutext") -> tuple[torch.Tensor, torch.Tensor, int]:
    """[CLS] src [SEP] + an empty target side, padded: ids and target_mask, (B, L) each, and how many
    sources were truncated."""
    ids = torch.full((len(srcs), seq_len), vocab.pad, dtype=torch.long)
    mask = torch.zeros((len(srcs), seq_len), dtype=torch.bool)
    truncated = 0
    for i, src in enumerate(vocab.encode(srcs)):
        seq, sep, cut = pack_one(src, None, seq_len, vocab, layout)
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, sep + 1 :] = True
        truncated += cut
    return ids, mask, truncated


def source_length(ids: torch.Tensor, target_mask: torch.Tensor, sep: int) -> torch.Tensor:
    """The target as long as the source (`length` "source"): puts [SEP] right after that many target positions of the
    packed batch `ids` (in place; padding follows) and returns the positions to hold, (B, L) bool: that [SEP] and
    everything after it. A target side too short for the source holds nothing."""
    L = ids.shape[1]
    start = target_mask.int().argmax(1, keepdim=True)  # the first target position; the source has start − 2 tokens
    end = 2 * start - 2  # where the [SEP] goes
    idx = torch.arange(L).expand_as(ids)
    ids.masked_fill_(idx == end, sep)
    return target_mask & (idx >= end)


def fixed_length(ids: torch.Tensor, target_mask: torch.Tensor, sep: int, lengths: torch.Tensor) -> torch.Tensor:
    """The target `lengths` (B,) tokens long: puts [SEP] right after that many target positions of the packed batch
    `ids` (in place; padding follows) and returns the positions to hold, (B, L) bool: that [SEP] and everything after
    it. A length is cut to what the target side holds (at least 1 token, and room for the [SEP])."""
    L = ids.shape[1]
    start = target_mask.int().argmax(1, keepdim=True)  # the first target position
    end = torch.minimum(start + lengths.view(-1, 1).clamp(min=1), torch.full_like(start, L - 1))
    idx = torch.arange(L, device=ids.device).expand_as(ids)
    ids.masked_fill_(idx == end, sep)
    return target_mask & (idx >= end)


@torch.inference_mode()
def predicted_lengths(model, ids: torch.Tensor, target_mask: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """The length head's target lengths (B,) for a packed batch of sources: the source's length plus the likeliest
    offset (model.target_length head)."""
    with autocast(ids.device, precision):
        memory = model.encode(model.embed(ids), target_mask, ids)
        logits = model.length_logits(memory, target_mask)
    source = (~target_mask).sum(1) - 2  # [CLS] and [SEP] are not source tokens
    return source + logits.argmax(-1) - length_range(model.config)


def resolve_length(length: str, run_config) -> str:
    """ "auto": the length head's for a model with one; the source's length for a run with the copy prior (its x0_hat
    starts as the aligned source, target token k at source token k, so the copy's length is its own); the model's
    choice (free) otherwise; else the value itself."""
    if length != "auto":
        return length
    if run_config.model.target_length == "head":
        return "predicted"
    return "source" if run_config.model.copy_source == "on" else "free"


def resolve_clamp_by(clamp_by: str, run_config) -> str:
    """ "auto": a model trained with the anchor loss, or whose x0_hat is the head's expected embedding (x0_from
    softmax), snaps by the head's argmax (its x0_hat is trained for the head, not to lie near one embedding);
    any other by the nearest embedding; else the value itself."""
    if clamp_by != "auto":
        return clamp_by
    by_head = run_config.train.anchor_weight > 0
    return "head" if by_head else "nearest"


CEDI_AUTO = 0.99  # DINOISER's --denoise-end
COPY_DIAGONAL_AUTO = 8.0  # λ of --copy-diagonal auto: chosen on bible-basic and Multi30k valid (docs/screens.md)


def resolve_cedi(cedi, run_config) -> float | None:
    """ "auto": DINOISER's 0.99 for a run with the classifier readout on the Gaussian process (chosen on Multi30k valid,
    README "Options beyond the paper"), off (None) for DiffuSeq's regression; else the value itself."""
    if cedi != "auto":
        return cedi
    m = run_config.model
    return CEDI_AUTO if m.x0_from == "classifier" and run_config.diffusion.process == "gaussian" else None


def resolve_copy_diagonal(copy_diagonal, run_config) -> float | None:
    """ "auto": COPY_DIAGONAL_AUTO for a run with the copy attention (README "Options beyond the paper"), off (None)
    otherwise; a weight for a run without the copy attention is refused."""
    has = run_config.model.copy_attention
    if copy_diagonal == "auto":
        return COPY_DIAGONAL_AUTO if has else None
    if copy_diagonal is not None and not has:
        raise SamplerError("--copy-diagonal is the copy attention's prior: this model has no copy attention (model.copy_attention)")
    return copy_diagonal


def batch_seed(seed: int, batch: int) -> int:
    """The generator seed of one batch: depends on the seed and the batch index only."""
    return seed * 1_000_003 + batch


def identity(loaded: Loaded, cfg: SampleConfig, precision: str, texts: list[str]) -> list[Any]:
    """Everything a decode's output depends on: the checkpoint (its manifest), the sample config, the
    precision the denoiser runs in, the device and the inputs (for `pieces.fingerprint`)."""
    manifest = loaded.checkpoint.manifest
    return [
        manifest.get("files"),
        manifest.get("step"),
        cfg,
        precision,
        loaded.device.type,
        hashlib.sha256("\x00".join(texts).encode("utf-8")).hexdigest(),
    ]


def decode(loaded: Loaded, dataset, cfg: SampleConfig, callback: Callback | None = None, keep: Pieces | None = None) -> Decoded:
    """Decode every source of a Dataset (columns src, trg) cfg.seeds times; keep the MBR pick.

    Under torchrun, batch b is decoded (and MBR-picked) by rank b mod world and gathered back. With `keep`,
    every finished batch is stored there as it completes and a batch already stored is not decoded again:
    an interrupted decode continues where it stopped, with the same output."""
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
    whole = identity(loaded, cfg, precision, list(dataset["src"])) if keep is not None else None
    n_steps = len(timesteps)
    on_step = lambda i, t: emit("step", {"done": i + 1, "total": n_steps, "t": t})  # host numbers: no device sync
    clamp_by = resolve_clamp_by(cfg.clamp_by, ck.config)
    cedi = resolve_cedi(cfg.cedi, ck.config)
    length = resolve_length(cfg.length, ck.config)
    if length == "source" and ck.config.model.layout != "diffutext":
        raise SamplerError("--length source needs the [CLS] src [SEP] trg layout; this model was imported with DiffuSeq's")
    if length == "predicted" and ck.config.model.target_length != "head":
        raise SamplerError("--length predicted needs a model trained with a length head (model.target_length head)")
    if length == "free" and ck.config.model.target_length == "head":
        raise SamplerError("--length free: this model was trained on true lengths and never wrote padding; use predicted or source")
    diagonal = resolve_copy_diagonal(cfg.copy_diagonal, ck.config)
    if ck.config.model.copy_attention:
        model.copy_diagonal = diagonal or 0.0
    for b in range(rank, -(-n // bs), world):
        key = fingerprint(whole, b) if keep is not None else ""
        stored = keep.get(key) if keep is not None else None
        if stored is not None:  # finished before an interruption: (pick, seconds, truncated) as it was
            mine[b], secs, cut = tuple(stored[0]), stored[1], stored[2]
            seconds, truncated, done = seconds + secs, truncated + cut, done + len(stored[0][0]) * cfg.seeds
            emit("progress", {"done": min(done * world, total), "total": total})
            continue
        ids, mask, cut = _pack_batch(dataset[b * bs : (b + 1) * bs]["src"], vocab, seq_len, ck.config.model.layout)
        truncated += cut
        batch_seconds = 0.0
        ids, mask = ids.to(loaded.device), mask.to(loaded.device)
        hold = None
        if length == "source":
            hold = source_length(ids, mask, vocab.sep)
        elif length == "predicted":
            hold = fixed_length(ids, mask, vocab.sep, predicted_lengths(model, ids, mask, precision))
        banned = torch.tensor([vocab.pad, vocab.cls, vocab.sep], device=loaded.device) if hold is not None else None
        per_seed = []
        for k in range(cfg.seeds):
            generator.manual_seed(batch_seed(cfg.seed + k, b))
            t0 = time.perf_counter()
            out = generate(
                model,
                loaded.alpha_bar,
                sampler,
                cfg.steps,
                ids,
                mask,
                clamp=cfg.clamp,
                generator=generator,
                precision=precision,
                self_condition_input=cfg.self_condition_input,
                callback=on_step,
                clamp_by=clamp_by,
                hold=hold,
                banned=banned,
                cedi=cedi,
            )
            out = out.cpu()  # one sync per batch
            batch_seconds += time.perf_counter() - t0
            per_seed.append(_to_text(out, mask.cpu(), vocab, cfg.dedup))
            done += ids.shape[0]
            emit("progress", {"done": min(done * world, total), "total": total})
        seconds += batch_seconds
        candidates = [list(c) for c in zip(*per_seed)]
        mine[b] = _pick(candidates) if cfg.seeds > 1 else ([c[0] for c in candidates], candidates, [], [])
        if keep is not None:
            keep.put(key, [mine[b], batch_seconds, cut])
        emit("batch_done", {"batch": b})
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
    return Decoded(hyps, candidates, seconds, len(timesteps), timesteps, diversity, precision, all_truncated, cedi, diagonal)


def scores(decoded: Decoded, refs: list[list[str]], seeds: int, script: str = "2023") -> dict[str, Any]:
    """Every metric of a decode against its references, with its diversity over seeds and its speed; beside them
    DiffuSeq's eval_seq2seq.py set (`diffuseq_*`, against the first reference) of the same picks and candidates."""
    first = [r[0] for r in refs]
    diffuseq = diffuseq_metrics.score(decoded.hyps, first, script)
    if seeds > 1:
        diffuseq.update(diffuseq_metrics.diversity(decoded.candidates, script))
    return {
        **metrics.score(decoded.hyps, refs),
        **decoded.diversity,
        **diffuseq,
        "diffuseq_script": script,
        "seconds": decoded.seconds,
        "sentences_per_s": len(decoded.hyps) * seeds / max(decoded.seconds, 1e-9),
    }


def score_predictions(path: Path, mbr: bool = False, script: str = "2023") -> tuple[str, dict[str, Any], list[str], list[list[str]]]:
    """Score a predictions file or a DiffuSeq output folder: (a title, the metrics, the texts scored and their references).

    - a `sample --out` file ({src, trg|refs, hyp}): every metric, the DiffuSeq set against the first reference;
    - a DiffuSeq decoded file ({recover, reference, source}): both sets on its cleaned text (`diffuseq_metrics`);
    - a folder of DiffuSeq seed files: as its eval_seq2seq.py takes it: with `mbr`, per source the select_best
      pick of the files' lines; without, each file scored alone and averaged, plus self-BLEU and div-4 over seeds.
    """
    from .data import jsonl

    path = Path(path)
    if path.is_dir():
        files = jsonl.decoded_files(path)
        seeds = [jsonl.read_decoded(f) for f in files]
        if len({len(s) for s in seeds}) > 1:
            raise jsonl.TaskError(
                f"{path}: its seed files differ in length ({', '.join(f'{f.name}: {len(s)}' for f, s in zip(files, seeds))}); "
                "line k of every file must decode the same source"
            )
        candidates = [[diffuseq_metrics.clean_recover(s[k][0]) for s in seeds] for k in range(len(seeds[0]))]
        references = [diffuseq_metrics.clean_reference(r) for _, r, _ in seeds[0]]
        if mbr:
            picks = [c[diffuseq_metrics.select_best(c, script)] for c in candidates]
            result = _both(picks, references, script)
            return (
                f"{path} (MBR of {len(files)} seed files, {len(picks)} sources)",
                {**result, "seed_files": len(files)},
                picks,
                [[r] for r in references],
            )
        per_file = [_both([c[i] for c in candidates], references, script) for i in range(len(files))]
        result = {
            k: statistics.fmean(f[k] for f in per_file)
            for k, v in per_file[0].items()
            if isinstance(v, float) and k not in ("count", "diffuseq_count")
        }
        result = {**per_file[0], **result, **(diffuseq_metrics.diversity(candidates, script) if len(files) > 1 else {})}
        return (
            f"{path} (mean of {len(files)} seed files, {len(references)} sources)",
            {**result, "seed_files": len(files), "files": {f.name: r for f, r in zip(files, per_file)}},
            [c[0] for c in candidates],
            [[r] for r in references],
        )
    if jsonl.is_decoded_file(path):
        rows = jsonl.read_decoded(path)
        hyps, refs = [diffuseq_metrics.clean_recover(h) for h, _, _ in rows], [diffuseq_metrics.clean_reference(r) for _, r, _ in rows]
        return f"{path} (DiffuSeq decoded file, {len(rows)} sentences)", _both(hyps, refs, script), hyps, [[r] for r in refs]
    hyps, refs = jsonl.read_predictions(path)
    result = {**metrics.score(hyps, refs), **diffuseq_metrics.score(hyps, [r[0] for r in refs], script), "diffuseq_script": script}
    return f"{path} ({len(hyps)} sentences)", result, hyps, refs


def _both(recovers: list[str], references: list[str], script: str) -> dict[str, Any]:
    """The standard metrics (on the cleaned text, stripped) and DiffuSeq's set (on the cleaned text as the script has it)."""
    standard = metrics.score([h.strip() for h in recovers], [[r.strip()] for r in references])
    return {**standard, **diffuseq_metrics.score(recovers, references, script), "diffuseq_script": script}


def predictions_jsonl(srcs: list[str], refs: list[list[str]], decoded: Decoded) -> str:
    """What `sample --out` writes: one {"src", "trg" | "refs", "hyp"} line per input (and its "candidates" over seeds)."""
    rows = [
        {"src": s, **({"refs": r} if len(r) > 1 else {"trg": r[0]} if r else {}), "hyp": h, **({"candidates": c} if len(c) > 1 else {})}
        for s, r, h, c in zip(srcs, refs, decoded.hyps, decoded.candidates)
    ]
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def diffuseq_seed_files(srcs: list[str], refs: list[list[str]], decoded: Decoded) -> dict[str, str]:
    """What `sample --format diffuseq` writes: DiffuSeq's decoding output, one file per seed (seed<K>.json) of
    {"recover", "reference", "source"} lines, so that its scripts/eval_seq2seq.py (and `evaluate FOLDER`) read it."""
    seeds = len(decoded.candidates[0]) if decoded.candidates else 1
    return {
        f"seed{k}.json": "".join(
            json.dumps({"recover": c[k], "reference": r[0] if r else "", "source": s}, ensure_ascii=False) + "\n"
            for s, r, c in zip(srcs, refs, decoded.candidates)
        )
        for k in range(seeds)
    }


def _pick(candidates: list[list[str]]) -> tuple[list[str], list[list[str]], list[float], list[float]]:
    """Per source: the MBR pick among its K candidates, their self-BLEU and div-4."""
    hyps, sb, d4 = [], [], []
    for cands in candidates:
        m = metrics.pairwise_bleu(cands)
        hyps.append(cands[metrics.mbr_pick(cands, m)])
        sb.append(metrics.self_bleu(m))
        d4.append(metrics.div_4(cands))
    return hyps, candidates, sb, d4


def _to_text(ids: torch.Tensor, target_mask: torch.Tensor, vocab, dedup: bool = False) -> list[str]:
    """The target side of each row with every special token ([SEP], [PAD], ...) dropped, as DiffuSeq's
    evaluation does (not cut at the first [SEP]: a stray [SEP] mid-sentence must not end the output). `dedup`:
    also every target token equal to the target token before it."""
    if dedup:
        target_mask = target_mask.clone()
        target_mask[:, 1:] &= (ids[:, 1:] != ids[:, :-1]) | ~target_mask[:, :-1]
    return vocab.decode([[tok for tok, keep in zip(row, m) if keep] for row, m in zip(ids.tolist(), target_mask.tolist())])
