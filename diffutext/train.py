"""The training loop, top to bottom (PAPER.md §1, §3).

`train(config, run_dir)` prepares the data and tokenizer, builds the denoiser and its EMA copy,
and runs AdamW with warm-up, gradient clipping and (optionally) the Distance Penalty. It writes
the run folder of `checkpoint.py` and reports progress through a callback: the engine never
prints. `--resume` restores weights, EMA, optimizer, RNG and data position; `init_from` starts a
fresh run (new optimizer, step 0) from another run's weights, the paper's "post-training".

Reliability: a resumed run replays exactly (CPU: bitwise) what the run left alone would
have done, including the partial log window, and log.jsonl is cut back to the checkpoint's step;
`should_stop` (polled once per step) ends the run with a checkpoint; a NaN/inf loss, gradient
norm or weight raises FloatingPointError naming the step and the terms and never reaches a
checkpoint. With max_minutes the learning rate decays by wall time, which no resume can replay
bitwise: exact resume holds for step-limited runs.

Under torchrun the same loop is data-parallel (DDP): every rank walks the same shuffled order,
draws the t and noise of the whole global batch from one shared generator and takes its slice,
so N processes (and K accumulation micro-steps, all-reducing only on the last) follow the same
trajectory as one process with the same global batch. Rank 0 alone writes logs and checkpoints.
"""

from __future__ import annotations

import copy
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from . import checkpoint as ckpt
from .allocator import limit_heap_fragmentation
from . import distributed as dist
from .config import RunConfig, with_vocab
from .data import tokenizer as tok
from .data.batches import Packed, choose_seq_len, pack_split
from .data.tasks import MissingSplit, load_split
from .data.tasks import resolve as resolve_task
from .diffusion import alpha_bar_table
from .losses import LossOptions, diffusion_loss, dp_window, draw_noise
from .timesteps import make_timesteps
from .model import Denoiser, count_parameters

Callback = Callable[[str, dict[str, Any]], None]


class TrainError(ValueError):
    """Bad training input (run folder, resume, init run); one clear line."""


def _check_finite(step: int, bad_step: torch.Tensor, sums: dict[str, Any], *modules: torch.nn.Module) -> None:
    """Raise FloatingPointError if any step so far had a non-finite loss or gradient norm, or a weight is not finite."""
    first = int(bad_step.item())
    if first < 0 and all(bool(torch.isfinite(p).all()) for m in modules for p in m.parameters()):
        return
    terms = [f"{k}={float(v):g}" for k, v in sums.items() if not math.isfinite(float(v))]
    where = f"step {first}" if first >= 0 else f"by step {step}"
    what = f"non-finite loss terms ({', '.join(terms)})" if terms else "non-finite loss or weights"
    raise FloatingPointError(f"{where}: {what}; training stopped, no checkpoint written after it "
                             "(try a lower --lr; --detect-anomaly finds the operation)")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise TrainError(f"unknown device {device!r}; expected auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainError("--device cuda was asked for but no CUDA GPU is available")
    return torch.device(device)


def autocast(device: torch.device, precision: str):
    """Mixed precision by autocast: bf16 or fp16 matrix products, float32 weights and reductions."""
    if precision in ("bf16", "fp16"):
        return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
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
    g = torch.Generator().manual_seed(1234)  # its own generator: the same draws on any device, no global state touched
    for b in range(t_cfg.eval_batches):
        rows = slice(b * t_cfg.batch_size, (b + 1) * t_cfg.batch_size)
        ids, mask = data.ids[rows].to(device), data.target_mask[rows].to(device)
        if ids.shape[0] == 0:
            break
        t = torch.randint(0, config.diffusion.T, (ids.shape[0],), generator=g).to(device)
        noise = draw_noise((*ids.shape, config.model.hidden_dim), False, g, **_option_draws(config)).to(device)
        with autocast(device, t_cfg.precision):
            terms = diffusion_loss(model, ids, mask, t, alpha_bar, noise=noise, options=LossOptions.from_config(config))
        for k, v in terms.items():
            totals[k] = totals.get(k, 0.0) + v.float().sum().item()
        n += ids.shape[0]
    model.train(was_training)
    return {f"valid_{k}": v / max(n, 1) for k, v in totals.items()}


class _Objective(torch.nn.Module):
    """The whole loss as one module, so that DDP sees one forward (and one all-reduce) per micro-step."""

    def __init__(self, model: Denoiser, compile: bool = False, options: LossOptions = LossOptions()):
        super().__init__()
        self.model, self.options = model, options
        self.denoiser = torch.compile(model) if compile else model  # same parameters; embed/logits pass through

    def forward(self, ids, mask, t, noise, alpha_bar, dp_weight, window, dp_partner):
        return diffusion_loss(self.denoiser, ids, mask, t, alpha_bar, dp_weight=dp_weight, window=window,
                              dp_partner=dp_partner, noise=noise, options=self.options)


def _option_draws(config: RunConfig) -> dict[str, bool]:
    """Which optional draws `draw_noise` makes for this model's options."""
    return {"self_condition": config.model.self_condition > 0, "absorbing": config.model.absorbing > 0}


def _check_fresh(run_dir: Path) -> None:
    if run_dir.exists() and any(run_dir.iterdir()):
        raise TrainError(f"run folder {run_dir} already exists and is not empty; pass --resume to continue it or choose another --out")


def train(config: RunConfig, run_dir: Path, *, resume: bool = False, device: str = "auto",
          callback: Callback | None = None, keep: int = 0, compile: bool = False,
          should_stop: Callable[[], bool] | None = None, detect_anomaly: bool = False) -> Path:
    """Train (or resume) a run; `should_stop()` is polled once per step and, when true, ends the run with a
    checkpoint (the caller decides why: a signal, a deadline); `detect_anomaly` runs autograd's anomaly mode."""
    with torch.autograd.set_detect_anomaly(detect_anomaly):
        try:
            return _train(config, run_dir, resume=resume, device=device, callback=callback, keep=keep,
                          compile=compile, should_stop=should_stop)
        except RuntimeError as e:
            if detect_anomaly and "nan" in str(e).lower():
                raise FloatingPointError(f"autograd anomaly: {str(e).splitlines()[0].rstrip('.')}; training stopped, "
                                         "no checkpoint written after it (the forward trace is printed above)") from e
            raise


def _train(config: RunConfig, run_dir: Path, *, resume: bool, device: str, callback: Callback | None, keep: int,
           compile: bool, should_stop: Callable[[], bool] | None) -> Path:
    dev = dist.setup(resolve_device(device))
    if dev.type == "cpu":
        limit_heap_fragmentation()
    rank, world, main = dist.rank(), dist.world(), dist.is_main()
    run_dir = Path(dist.broadcast_object(str(run_dir)))  # rank 0's name (a default name holds the start time)
    emit = (callback or (lambda event, info: None)) if main else (lambda event, info: None)
    t_cfg = config.train

    restart = False
    if resume and not ckpt.list_checkpoints(run_dir):
        if not (run_dir / "config.json").is_file():
            raise TrainError(f"--resume: {run_dir} is not a run folder (no config.json); nothing to resume")
        resume, restart = False, True  # killed before its first checkpoint: start it over in place
    if resume:
        prior = ckpt.open_run(run_dir)
        config = replace(prior.config, train=replace(prior.config.train, max_steps=t_cfg.max_steps,
                                                       max_minutes=t_cfg.max_minutes))
        t_cfg = config.train
    elif not restart:
        dist.main_first(lambda: _check_fresh(run_dir), TrainError)
    accum = t_cfg.grad_accum
    if t_cfg.batch_size % (world * accum):
        raise TrainError(f"batch size {t_cfg.batch_size} does not split into {world} process(es) × {accum} accumulation "
                         f"step(s); use a multiple of {world * accum}")
    micro = t_cfg.batch_size // (world * accum)

    torch.manual_seed(t_cfg.seed)
    random.seed(t_cfg.seed)
    task_source = resolve_task(t_cfg.task, t_cfg.data_dir).describe()
    emit("status", {"message": f"loading task {task_source}"})
    if not main:
        dist.barrier()  # rank 0 loads first and fills the datasets cache; the others then read it
    train_ds = load_split(t_cfg.task, t_cfg.train_split, t_cfg.data_dir)
    try:
        valid_ds = load_split(t_cfg.task, "valid", t_cfg.data_dir) if t_cfg.eval_every else None
    except MissingSplit:  # no validation split: train without validation loss (a broken one is an error)
        valid_ds = None
    if main:
        dist.barrier()
    vocab = tok.from_str(dist.main_first(lambda: prepare_vocab(config, run_dir, resume, train_ds).to_str(), TrainError))
    config = with_vocab(config, vocab.size)
    if config.model.seq_len == 0:  # follow the data: no training pair cut, no source cut at decoding
        config = replace(config, model=replace(config.model, seq_len=choose_seq_len(train_ds, vocab)))
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
    if rank:  # dropout masks differ between ranks; the diffusion noise comes from noise_gen, shared by all
        torch.manual_seed(t_cfg.seed + 1_000_003 * rank)
    # fused AdamW: one kernel over all parameters instead of a dozen per-parameter ops
    opt = torch.optim.AdamW(model.parameters(), lr=t_cfg.lr, weight_decay=t_cfg.weight_decay, fused=True)
    scaler = torch.amp.GradScaler(dev.type, enabled=t_cfg.precision == "fp16")
    alpha_bar = alpha_bar_table(config.diffusion.schedule, config.diffusion.T).float().to(dev)
    timesteps = make_timesteps(config.diffusion.timestep_sampler, config.diffusion.T, dev, alpha_bar, model.embedding,
                               config.diffusion.noise_factor)
    window = tuple(w.to(dev) for w in dp_window(alpha_bar_table(config.diffusion.schedule, config.diffusion.T), t_cfg.dp_window))
    objective = _Objective(model, compile, LossOptions.from_config(config))
    ddp = None
    if dist.active():
        ddp = torch.nn.parallel.DistributedDataParallel(objective, device_ids=[dev.index] if dev.type == "cuda" else None,
                                                        gradient_as_bucket_view=True)
    noise_gen = torch.Generator(device=dev).manual_seed(t_cfg.seed)  # t and noise of the global batch: the same on every rank

    step, elapsed_before = 0, 0.0
    sums: dict[str, torch.Tensor] = {}
    window_steps = 0
    batches = Batches(data.train, t_cfg.batch_size, t_cfg.seed)
    if resume:
        ckpt.load_weights(model, prior.weights("model"), str(prior.folder))
        ckpt.load_weights(ema, prior.weights("ema"), str(prior.folder))
        state = prior.state()
        opt.load_state_dict(state["optimizer"])
        step, elapsed_before = int(state["step"]), float(state.get("elapsed", 0.0))
        batches = Batches(data.train, t_cfg.batch_size, t_cfg.seed, **state["data"])
        ranks = state.get("rng_ranks")
        _set_rng_state(ranks[rank] if ranks and len(ranks) == world else state["rng"])
        if rank and not (ranks and len(ranks) == world):  # another world size: fresh dropout streams
            torch.manual_seed(t_cfg.seed + 1_000_003 * rank + step)
        if "noise_rng" in state:
            noise_gen.set_state(state["noise_rng"])
        else:  # a checkpoint from before the shared noise generator
            noise_gen.manual_seed(t_cfg.seed + step)
        if "scaler" in state and scaler.is_enabled():
            scaler.load_state_dict(state["scaler"])
        timesteps.load_state_dict(state.get("timesteps", {}))
        log_window = state.get("log_window", {})  # the partial log window, so the next record averages the same steps
        sums = {k: v.to(dev) for k, v in log_window.get("sums", {}).items()}
        window_steps = int(log_window.get("steps", 0))
        if main:
            ckpt.truncate_log(run_dir, step)
    elif main:
        ckpt.init_run(run_dir, config, vocab)
        if restart:
            ckpt.truncate_log(run_dir, 0)

    def save() -> None:
        _check_finite(step, bad_step, sums, model, ema)  # a checkpoint never holds NaN weights
        rngs = dist.all_gather_object(_rng_state())  # every rank's dropout stream, for an exact resume
        if main:
            state = {"optimizer": opt.state_dict(), "step": step, "rng": rngs[0], "data": batches.position(),
                     "elapsed": elapsed_before + (time.perf_counter() - start), "noise_rng": noise_gen.get_state(),
                     "timesteps": timesteps.state_dict(),
                     "log_window": {"sums": {k: torch.as_tensor(v).detach().cpu() for k, v in sums.items()}, "steps": window_steps}}
            if world > 1:
                state["rng_ranks"] = rngs
            if scaler.is_enabled():
                state["scaler"] = scaler.state_dict()
            folder = ckpt.save_checkpoint(run_dir, step, model.state_dict(), ema.state_dict(), state, keep=keep)
            emit("save", {"step": step, "path": str(folder)})
        dist.barrier()

    emit("start", {"run_dir": str(run_dir), "parameters": count_parameters(model), "train_examples": len(data.train), "task_source": task_source,
                   "truncated": data.train.truncated, "vocab_size": vocab.size, "max_steps": t_cfg.max_steps,
                   "step": step, "device": str(dev), "world_size": world, "grad_accum": accum,
                   "precision": t_cfg.precision, "config": config.to_dict()})
    model.train()
    start = time.perf_counter()
    budget = t_cfg.max_minutes * 60.0
    window_start = time.perf_counter()
    tokens_per_step = t_cfg.batch_size * config.model.seq_len
    last_saved = step
    bad_step = torch.tensor(-1, device=dev)  # first step with a non-finite loss or grad norm, tracked without a sync
    while step < t_cfg.max_steps:
        elapsed = elapsed_before + time.perf_counter() - start
        if budget and world > 1:
            elapsed = dist.broadcast_object(elapsed)  # rank 0's clock: every rank stops and sets the lr alike
        if budget and elapsed >= budget:
            break
        stop = should_stop is not None and should_stop()
        if world > 1:  # every rank stops at the same step: rank 0's signal decides, checked at log steps
            stop = step % t_cfg.log_every == 0 and dist.broadcast_object(stop)
        if stop:
            emit("stop", {"step": step})
            break
        progress = max(step / t_cfg.max_steps, elapsed / budget if budget else 0.0)
        lr = lr_at(step, config, progress)
        for group in opt.param_groups:
            group["lr"] = lr
        ids_all, mask_all = batches.next()  # the global batch, the same rows on every rank
        t_all, weights_all = timesteps.sample(ids_all.shape[0], noise_gen)
        row_losses = torch.zeros(ids_all.shape[0], device=dev) if timesteps.learns else None  # this rank's rows filled
        dp_weight = t_cfg.distance_penalty if progress >= t_cfg.dp_from else 0.0  # dp_from: DP for the last part only
        noise_all = draw_noise((*ids_all.shape, config.model.hidden_dim), dp_weight > 0, noise_gen, dev, **_option_draws(config))
        opt.zero_grad(set_to_none=True)
        for k in range(accum):  # micro-step k of this rank: rows of chunk k·world + rank
            rows = slice((k * world + rank) * micro, (k * world + rank + 1) * micro)
            ids, mask = ids_all[rows].to(dev, non_blocking=True), mask_all[rows].to(dev, non_blocking=True)
            last = k == accum - 1
            with ddp.no_sync() if (ddp is not None and not last) else nullcontext():  # all-reduce once, on the last
                with autocast(dev, t_cfg.precision):
                    terms = (ddp or objective)(ids, mask, t_all[rows], noise_all[rows], alpha_bar, dp_weight,
                                               window, t_cfg.dp_partner)
                    per_row = terms["loss"] if weights_all is None else terms["loss"] * weights_all[rows]
                    loss = per_row.mean() / accum  # DDP averages over ranks: the global-batch mean
                scaler.scale(loss).backward()
            for name, v in terms.items():
                sums[name] = sums.get(name, 0.0) + v.detach().float().mean() / accum
            if timesteps.learns:
                row_losses[rows] = terms["loss"].detach().float()
        if timesteps.learns:  # the loss-aware sampler sees the whole global batch on every rank
            timesteps.update(t_all, dist.all_sum(row_losses) if world > 1 else row_losses)
        scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t_cfg.grad_clip if t_cfg.grad_clip > 0 else float("inf"))
        scaler.step(opt)
        scaler.update()
        step += 1
        finite = torch.isfinite(loss.detach())
        if not scaler.is_enabled():  # with fp16's scaler an inf gradient is expected: that step is skipped, the scale lowered
            finite = finite & torch.isfinite(grad_norm.detach())
        bad_step = torch.where((bad_step < 0) & ~finite, step, bad_step)
        _ema_update(ema, model, min(t_cfg.ema_decay, (1 + step) / (10 + step)))

        sums["grad_norm"] = sums.get("grad_norm", 0.0) + grad_norm.detach().float()
        window_steps += 1
        if step % t_cfg.log_every == 0 or step == t_cfg.max_steps:
            now = time.perf_counter()
            _check_finite(step, bad_step, sums)
            names = list(sums)
            means = dist.all_mean(torch.stack([sums[k] for k in names]) / window_steps).tolist()  # over ranks: the global batch
            record = {"step": step, **dict(zip(names, means)), "lr": lr,
                      "tokens_per_s": tokens_per_step * window_steps / max(now - window_start, 1e-9),
                      "elapsed_s": elapsed_before + now - start}
            if main:
                ckpt.append_log(run_dir, record)
            emit("log", record)
            sums, window_start, window_steps = {}, now, 0
        if main and data.valid is not None and t_cfg.eval_every and step % t_cfg.eval_every == 0:
            record = {"step": step, **validation_loss(ema, data.valid, config, alpha_bar, dev, window)}
            ckpt.append_log(run_dir, record)
            emit("eval", record)
        if t_cfg.save_every and step % t_cfg.save_every == 0:
            save()
            last_saved = step
    if dist.broadcast_object(step != last_saved or not ckpt.list_checkpoints(run_dir)):
        save()
    emit("end", {"step": step, "elapsed_s": elapsed_before + time.perf_counter() - start, "run_dir": str(run_dir)})
    return run_dir
