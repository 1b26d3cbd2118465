"""The training loop, top to bottom (PAPER.md §1, §3).

`train(config, run_dir)` prepares the data and tokenizer, builds the denoiser and its EMA copy,
and runs AdamW with warm-up, gradient clipping and (optionally) the Distance Penalty. It writes
the run folder of `checkpoint.py` and reports progress through a callback: the engine never
prints. `--resume` restores weights, EMA, optimizer, RNG and data position; `init_from` starts a
fresh run (new optimizer, step 0) from another run's weights, the paper's "post-training".
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from . import checkpoint as ckpt
from .config import RunConfig, with_vocab
from .data import tokenizer as tok
from .data.batches import Packed, pack_split
from .data.tasks import MissingSplit, load_split
from .data.tasks import resolve as resolve_task
from .diffusion import alpha_bar_table
from .losses import diffusion_loss, dp_window
from .timesteps import make_timesteps
from .model import Denoiser, count_parameters

Callback = Callable[[str, dict[str, Any]], None]


class TrainError(ValueError):
    """Bad training input (run folder, resume, init run); one clear line."""


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise TrainError(f"unknown device {device!r}; expected auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainError("--device cuda was asked for but no CUDA GPU is available")
    return torch.device(device)


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def lr_at(step: int, config: RunConfig, progress: float) -> float:
    """Linear warm-up over warmup_steps, then constant or linear decay to 0 at progress 1."""
    t = config.train
    if t.warmup_steps and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.lr_schedule == "constant":
        return t.lr
    return t.lr * max(0.0, 1.0 - progress)


@dataclass
class Data:
    train: Packed
    valid: Packed | None


def prepare_vocab(config: RunConfig, run_dir: Path, resume: bool, train_ds) -> tok.Vocab:
    if resume:
        return ckpt.open_run(run_dir).vocab
    if config.train.init_from:
        vocab = ckpt.open_run(Path(config.train.init_from)).vocab
        if config.train.tokenizer and tok.load(config.train.tokenizer).to_str() != vocab.to_str():
            raise TrainError(f"--tokenizer {config.train.tokenizer} differs from the tokenizer of --init-from {config.train.init_from}; "
                             "a post-trained run keeps its initial run's tokenizer (drop --tokenizer)")
        return vocab
    if config.train.tokenizer:
        return tok.load(config.train.tokenizer)
    texts = list(train_ds["src"]) + list(train_ds["trg"])
    return tok.train(texts, config.train.vocab_size, config.train.tokenizer_type)


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    ema_p = [p for p in ema.parameters()]
    model_p = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_p, model_p, 1.0 - decay)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Batches:
    """Shuffled fixed-size batches; the order depends only on (seed, epoch), so a position resumes exactly."""

    def __init__(self, data: Packed, batch_size: int, seed: int, epoch: int = 0, index: int = 0):
        if len(data) < batch_size:
            raise TrainError(f"the training split has {len(data)} examples, fewer than one batch of {batch_size}")
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.epoch, self.index = epoch, index
        self._order = self._perm()

    def _perm(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.data), generator=g)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if (self.index + 1) * self.batch_size > len(self.data):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._perm()
        rows = self._order[self.index * self.batch_size:(self.index + 1) * self.batch_size]
        self.index += 1
        return self.data.ids[rows], self.data.target_mask[rows]

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}


@torch.no_grad()
def validation_loss(model, data: Packed, config: RunConfig, alpha_bar, device, window) -> dict[str, float]:
    """Mean loss terms on the first eval_batches batches of valid, with fixed t and noise (comparable over time)."""
    t_cfg = config.train
    was_training = model.training
    model.eval()
    totals: dict[str, float] = {}
    n = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        for b in range(t_cfg.eval_batches):
            rows = slice(b * t_cfg.batch_size, (b + 1) * t_cfg.batch_size)
            ids, mask = data.ids[rows].to(device), data.target_mask[rows].to(device)
            if ids.shape[0] == 0:
                break
            t = torch.randint(0, config.diffusion.T, (ids.shape[0],)).to(device)
            with autocast(device, t_cfg.precision):
                terms = diffusion_loss(model, ids, mask, t, alpha_bar)
            for k, v in terms.items():
                totals[k] = totals.get(k, 0.0) + v.float().sum().item()
            n += ids.shape[0]
    model.train(was_training)
    return {f"valid_{k}": v / max(n, 1) for k, v in totals.items()}


def train(config: RunConfig, run_dir: Path, *, resume: bool = False, device: str = "auto",
          callback: Callback | None = None, keep: int = 0) -> Path:
    emit = callback or (lambda event, info: None)
    run_dir = Path(run_dir)
    dev = resolve_device(device)
    t_cfg = config.train

    if resume:
        prior = ckpt.open_run(run_dir)
        config = replace(prior.config, train=replace(prior.config.train, max_steps=t_cfg.max_steps,
                                                       max_minutes=t_cfg.max_minutes))
        t_cfg = config.train
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise TrainError(f"run folder {run_dir} already exists and is not empty; pass --resume to continue it or choose another --out")

    torch.manual_seed(t_cfg.seed)
    random.seed(t_cfg.seed)
    task_source = resolve_task(t_cfg.task, t_cfg.data_dir).describe()
    emit("status", {"message": f"loading task {task_source}"})
    train_ds = load_split(t_cfg.task, t_cfg.train_split, t_cfg.data_dir)
    try:
        valid_ds = load_split(t_cfg.task, "valid", t_cfg.data_dir) if t_cfg.eval_every else None
    except MissingSplit:  # no validation split: train without validation loss (a broken one is an error)
        valid_ds = None
    vocab = prepare_vocab(config, run_dir, resume, train_ds)
    config = with_vocab(config, vocab.size)
    data = Data(pack_split(train_ds, vocab, config.model.seq_len),
                pack_split(valid_ds, vocab, config.model.seq_len) if valid_ds is not None else None)

    model = Denoiser(config.model).to(dev)
    if t_cfg.init_from and not resume:
        init = ckpt.open_run(Path(t_cfg.init_from))
        if init.config.model != config.model:
            raise TrainError(f"--init-from {t_cfg.init_from}: its model config differs from this run's; use the same preset/sizes")
        ckpt.load_weights(model, init.weights("model"), str(init.folder))
        ema = copy.deepcopy(model)
        ckpt.load_weights(ema, init.weights("ema"), str(init.folder))
    else:
        ema = copy.deepcopy(model)
    ema.eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=t_cfg.lr, weight_decay=t_cfg.weight_decay)
    alpha_bar = alpha_bar_table(config.diffusion.schedule, config.diffusion.T).float().to(dev)
    timesteps = make_timesteps(config.diffusion.timestep_sampler, config.diffusion.T, dev)
    window = tuple(w.to(dev) for w in dp_window(alpha_bar_table(config.diffusion.schedule, config.diffusion.T), t_cfg.dp_window))

    step, elapsed_before = 0, 0.0
    batches = Batches(data.train, t_cfg.batch_size, t_cfg.seed)
    if resume:
        ckpt.load_weights(model, prior.weights("model"), str(prior.folder))
        ckpt.load_weights(ema, prior.weights("ema"), str(prior.folder))
        state = prior.state()
        opt.load_state_dict(state["optimizer"])
        step, elapsed_before = int(state["step"]), float(state.get("elapsed", 0.0))
        batches = Batches(data.train, t_cfg.batch_size, t_cfg.seed, **state["data"])
        _set_rng_state(state["rng"])
        timesteps.load_state_dict(state.get("timesteps", {}))
    else:
        ckpt.init_run(run_dir, config, vocab)

    def save() -> None:
        state = {"optimizer": opt.state_dict(), "step": step, "rng": _rng_state(), "data": batches.position(),
                 "timesteps": timesteps.state_dict(),
                 "elapsed": elapsed_before + (time.perf_counter() - start)}
        folder = ckpt.save_checkpoint(run_dir, step, model.state_dict(), ema.state_dict(), state, keep=keep)
        emit("save", {"step": step, "path": str(folder)})

    emit("start", {"run_dir": str(run_dir), "parameters": count_parameters(model), "train_examples": len(data.train), "task_source": task_source,
                   "truncated": data.train.truncated, "vocab_size": vocab.size, "max_steps": t_cfg.max_steps,
                   "step": step, "device": str(dev), "config": config.to_dict()})
    model.train()
    start = time.perf_counter()
    budget = t_cfg.max_minutes * 60.0
    sums: dict[str, torch.Tensor] = {}
    window_start, window_steps = time.perf_counter(), 0
    tokens_per_step = t_cfg.batch_size * config.model.seq_len
    last_saved = step
    while step < t_cfg.max_steps:
        elapsed = elapsed_before + time.perf_counter() - start
        if budget and elapsed >= budget:
            break
        progress = max(step / t_cfg.max_steps, elapsed / budget if budget else 0.0)
        lr = lr_at(step, config, progress)
        for group in opt.param_groups:
            group["lr"] = lr
        ids, mask = batches.next()
        ids, mask = ids.to(dev, non_blocking=True), mask.to(dev, non_blocking=True)
        t, weights = timesteps.sample(ids.shape[0])
        with autocast(dev, t_cfg.precision):
            terms = diffusion_loss(model, ids, mask, t, alpha_bar, dp_weight=t_cfg.distance_penalty,
                                   window=window, dp_partner=t_cfg.dp_partner)
        loss = (terms["loss"] if weights is None else terms["loss"] * weights).mean()
        timesteps.update(t, terms["loss"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t_cfg.grad_clip if t_cfg.grad_clip > 0 else float("inf"))
        opt.step()
        step += 1
        _ema_update(ema, model, min(t_cfg.ema_decay, (1 + step) / (10 + step)))

        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v.detach().float().mean()
        sums["grad_norm"] = sums.get("grad_norm", 0.0) + grad_norm.detach().float()
        window_steps += 1
        if step % t_cfg.log_every == 0 or step == t_cfg.max_steps:
            now = time.perf_counter()
            record = {"step": step, **{k: (v / window_steps).item() for k, v in sums.items()}, "lr": lr,
                      "tokens_per_s": tokens_per_step * window_steps / max(now - window_start, 1e-9),
                      "elapsed_s": elapsed_before + now - start}
            bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
            if bad:
                raise FloatingPointError(f"step {step}: non-finite {', '.join(bad)}; the last good checkpoint is kept")
            ckpt.append_log(run_dir, record)
            emit("log", record)
            sums, window_start, window_steps = {}, now, 0
        if data.valid is not None and t_cfg.eval_every and step % t_cfg.eval_every == 0:
            record = {"step": step, **validation_loss(ema, data.valid, config, alpha_bar, dev, window)}
            ckpt.append_log(run_dir, record)
            emit("eval", record)
        if t_cfg.save_every and step % t_cfg.save_every == 0:
            save()
            last_saved = step
    if step != last_saved or not ckpt.list_checkpoints(run_dir):
        save()
    emit("end", {"step": step, "elapsed_s": elapsed_before + time.perf_counter() - start, "run_dir": str(run_dir)})
    return run_dir
