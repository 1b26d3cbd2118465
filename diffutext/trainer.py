"""One training run's state and its steps (method.md §1, §3): the denoiser and its EMA copy, fused
AdamW with warm-up and linear decay, gradient clipping, the Distance Penalty's partner pass (in
`losses.py`), the data order and the noise, the validation loss, and what a checkpoint holds of them.

`train.py` prepares a run (data, tokenizer, run folder, resume) and drives a `Trainer` step by step.
Under torchrun every rank walks the same shuffled order and takes its slice of one global batch's
noise, so N processes follow the trajectory of one with the same global batch.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from . import distributed as dist
from . import plm
from .config import RunConfig
from .data.batches import Packed, held_end
from .device import autocast, resolve_precision
from .diffusion import alpha_bar_table
from .losses import LossOptions, diffusion_loss, dp_window, draw_noise
from .model import Denoiser, build_model
from .timesteps import make_timesteps

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
    raise FloatingPointError(
        f"{where}: {what}; training stopped, no checkpoint written after it (try a lower --lr; --detect-anomaly finds the operation)"
    )


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


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1.0 - decay)


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
        rows = self._order[self.index * self.batch_size : (self.index + 1) * self.batch_size]
        self.index += 1
        return self.data.ids[rows], self.data.target_mask[rows]

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}


@torch.no_grad()
def validation_loss(model, data: Packed, config: RunConfig, alpha_bar, device, precision: str = "fp32", pad: int = 0) -> dict[str, float]:
    """Mean loss terms on the first eval_batches batches of valid, with fixed t and noise (comparable over time);
    `pad`: the [PAD] id (where a length head's target ends, `held_end`)."""
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
        noise = draw_noise((*ids.shape, config.model.hidden_dim), False, g, **option_draws(config)).to(device)
        hold = held_end(ids, mask, pad) if config.model.needs_hold else None
        with autocast(device, precision):
            terms = diffusion_loss(model, ids, mask, t, alpha_bar, noise=noise, options=LossOptions.from_config(config), hold=hold)
        for k, v in terms.items():
            totals[k] = totals.get(k, 0.0) + v.float().sum().item()
        n += ids.shape[0]
    model.train(was_training)
    return {f"valid_{k}": v / max(n, 1) for k, v in totals.items()}


class Objective(torch.nn.Module):
    """The whole loss as one module, so that DDP sees one forward (and one all-reduce) per micro-step."""

    def __init__(self, model: Denoiser, compile: bool = False, options: LossOptions = LossOptions()):
        super().__init__()
        self.model, self.options = model, options
        self.denoiser = torch.compile(model) if compile else model  # same parameters; embed/logits pass through

    def forward(self, ids, mask, t, noise, alpha_bar, dp_weight, window, dp_partner, hold=None):
        return diffusion_loss(
            self.denoiser,
            ids,
            mask,
            t,
            alpha_bar,
            dp_weight=dp_weight,
            window=window,
            dp_partner=dp_partner,
            noise=noise,
            options=self.options,
            hold=hold,
        )


def option_draws(config: RunConfig) -> dict[str, bool]:
    """Which optional draws `draw_noise` makes for this model's options."""
    return {
        "self_condition": config.model.self_condition > 0,
        "absorbing": config.model.absorbing > 0 or config.diffusion.process == "mask",
    }  # mask: the masking draws


class Trainer:
    """The state of one training run (model, EMA, optimizer, noise, data position, log window) and its steps."""

    def __init__(self, config: RunConfig, dev: torch.device, data: Data, compile: bool, init: bool = True, pad: int = 0):
        """`init`: start from `init_from`'s weights when the config names a run (a resumed run has its own)."""
        t_cfg = self.t_cfg = config.train
        self.config, self.dev, self.data = config, dev, data
        self.rank, self.world = dist.rank(), dist.world()  # the batch split was checked by train() before any data loaded
        self.micro = t_cfg.batch_size // (self.world * t_cfg.grad_accum)
        self.pad = pad  # the [PAD] id: where a length head's target ends (`held_end`)
        self.model, self.ema = self._build_models(t_cfg.init_from if init else "", t_cfg.init_plm if init else "")
        if self.rank:  # dropout masks differ between ranks; the diffusion noise comes from noise_gen, shared by all
            torch.manual_seed(t_cfg.seed + 1_000_003 * self.rank)
        # fused AdamW: one kernel over all parameters instead of a dozen per-parameter ops
        self.opt = torch.optim.AdamW(self.param_groups(), lr=t_cfg.lr, weight_decay=t_cfg.weight_decay, fused=True)
        self.precision = resolve_precision(t_cfg.precision, dev)  # "auto" decided once, for this device
        self.scaler = torch.amp.GradScaler(dev.type, enabled=self.precision == "fp16")
        d = config.diffusion
        self.alpha_bar = alpha_bar_table(d.schedule, d.T).float().to(dev)
        table = getattr(self.model, "table", lambda: self.model.embedding.weight)  # the live embedding table
        self.timesteps = make_timesteps(d.timestep_sampler, d.T, dev, self.alpha_bar, table, d.noise_factor)
        self.window = tuple(w.to(dev) for w in dp_window(alpha_bar_table(d.schedule, d.T), t_cfg.dp_window, t_cfg.dp_window_ends))
        self.objective = Objective(self.model, compile, LossOptions.from_config(config))
        self.ddp = None
        if dist.active():
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.objective, gradient_as_bucket_view=True, device_ids=[dev.index] if dev.type == "cuda" else None
            )
        self.noise_gen = torch.Generator(device=dev).manual_seed(t_cfg.seed)  # t and noise of the global batch, every rank alike
        self.batches = Batches(data.train, t_cfg.batch_size, t_cfg.seed)
        self.step, self.elapsed_before, self.start = 0, 0.0, time.perf_counter()
        self.sums: dict[str, torch.Tensor] = {}  # loss terms summed over the steps of the current log window
        self.window_steps, self.window_start = 0, self.start
        self.bad_step = torch.tensor(-1, device=dev)  # first step with a non-finite loss or grad norm, tracked without a sync

    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW's parameter groups: the word embedding on its own learning rate (`embedding_lr`, as a multiple
        `lr_scale` of the schedule's lr) when one is given, everything else on lr. One group otherwise."""
        params = list(self.model.parameters())
        scale = self.t_cfg.embedding_lr / self.t_cfg.lr if self.t_cfg.embedding_lr else 1.0
        embedding = getattr(self.model, "embedding", None)
        if scale == 1.0 or embedding is None:
            return [{"params": params, "lr_scale": 1.0}]
        rest = [p for p in params if p is not embedding.weight]
        return [{"params": rest, "lr_scale": 1.0}, {"params": [embedding.weight], "lr_scale": scale}]

    @staticmethod
    def check_batch_split(t_cfg, world: int) -> None:
        if t_cfg.batch_size % (world * t_cfg.grad_accum):
            raise TrainError(
                f"batch size {t_cfg.batch_size} does not split into {world} process(es) × {t_cfg.grad_accum} "
                f"accumulation step(s); use a multiple of {world * t_cfg.grad_accum}"
            )

    def _build_models(self, init_from: str, init_plm: str = "") -> tuple[Denoiser, Denoiser]:
        """The denoiser and its EMA copy, from `init_from`'s weights when given (post-training), or with the
        pretrained encoder `init_plm`'s tensors where it has them (DiffuSeq's PLM initialisation)."""
        model = build_model(self.config)
        if init_plm:
            plm.load(model, init_plm)
        model = model.to(self.dev)
        init = ckpt.open_run(Path(init_from)) if init_from else None
        if init is not None:
            if init.config.model != self.config.model:
                raise TrainError(f"--init-from {init_from}: its model config differs from this run's; use the same preset/sizes")
            ckpt.load_weights(model, init.weights("model"), str(init.folder))
        ema = copy.deepcopy(model)
        if init is not None:
            ckpt.load_weights(ema, init.weights("ema"), str(init.folder))
        ema.eval().requires_grad_(False)
        return model, ema

    def set_lexicon(self, lex: torch.Tensor) -> None:
        """The copy prior's lexicon (counted when a run starts) into the model and its EMA copy alike."""
        for m in (self.model, self.ema):
            m.lexicon.copy_(lex)

    def restore(self, prior: ckpt.Checkpoint) -> None:
        """Continue from a checkpoint: weights, EMA, optimizer, RNG streams, data position, partial log window."""
        ckpt.load_weights(self.model, prior.weights("model"), str(prior.folder))
        ckpt.load_weights(self.ema, prior.weights("ema"), str(prior.folder))
        state = prior.state()
        self.opt.load_state_dict(state["optimizer"])
        self.step, self.elapsed_before = int(state["step"]), float(state.get("elapsed", 0.0))
        self.batches = Batches(self.data.train, self.t_cfg.batch_size, self.t_cfg.seed, **state["data"])
        ranks = state.get("rng_ranks")
        same_world = bool(ranks) and len(ranks) == self.world
        _set_rng_state(ranks[self.rank] if same_world else state["rng"])
        if self.rank and not same_world:  # another world size: fresh dropout streams
            torch.manual_seed(self.t_cfg.seed + 1_000_003 * self.rank + self.step)
        if "noise_rng" in state:
            self.noise_gen.set_state(state["noise_rng"])
        else:  # a checkpoint from before the shared noise generator
            self.noise_gen.manual_seed(self.t_cfg.seed + self.step)
        if "scaler" in state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.timesteps.load_state_dict(state.get("timesteps", {}))
        log_window = state.get("log_window", {})  # the partial log window, so the next record averages the same steps
        self.sums = {k: v.to(self.dev) for k, v in log_window.get("sums", {}).items()}
        self.window_steps = int(log_window.get("steps", 0))

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.start

    def run(self, run_dir: Path, emit: Callback, keep: int, should_stop: Callable[[], bool] | None) -> None:
        """Optimizer steps until the step or time budget is spent or a stop is asked for; log, validate and save on schedule."""
        t_cfg, main = self.t_cfg, dist.is_main()
        self.model.train()
        self.start = self.window_start = time.perf_counter()
        budget = t_cfg.max_minutes * 60.0
        last_saved = self.step
        while self.step < t_cfg.max_steps:
            elapsed = self.elapsed()
            if budget and self.world > 1:
                elapsed = dist.broadcast_object(elapsed)  # rank 0's clock: every rank stops and sets the lr alike
            if budget and elapsed >= budget:
                break
            stop = should_stop is not None and should_stop()
            if self.world > 1:  # every rank stops at the same step: rank 0's signal decides, checked at log steps
                stop = self.step % t_cfg.log_every == 0 and dist.broadcast_object(stop)
            if stop:
                emit("stop", {"step": self.step})
                break
            progress = max(self.step / t_cfg.max_steps, elapsed / budget if budget else 0.0)
            self.optimizer_step(lr_at(self.step, self.config, progress), t_cfg.distance_penalty if progress >= t_cfg.dp_from else 0.0)
            if self.step % t_cfg.log_every == 0 or self.step == t_cfg.max_steps:
                record = self.log_record()
                if main:
                    ckpt.append_log(run_dir, record)
                emit("log", record)
            if main and self.data.valid is not None and t_cfg.eval_every and self.step % t_cfg.eval_every == 0:
                record = {
                    "step": self.step,
                    **validation_loss(self.ema, self.data.valid, self.config, self.alpha_bar, self.dev, self.precision, self.pad),
                }
                ckpt.append_log(run_dir, record)
                emit("eval", record)
            if t_cfg.save_every and self.step % t_cfg.save_every == 0:
                self.save(run_dir, emit, keep)
                last_saved = self.step
        if dist.broadcast_object(self.step != last_saved or not ckpt.list_checkpoints(run_dir)):
            self.save(run_dir, emit, keep)

    def optimizer_step(self, lr: float, dp_weight: float) -> None:
        """One optimizer step on the next global batch: this rank's micro-batches, clipping, AdamW, EMA. `dp_weight`
        is the Distance Penalty's λ of this step (0 before `dp_from` of the budget)."""
        t_cfg, world, rank, micro = self.t_cfg, self.world, self.rank, self.micro
        for group in self.opt.param_groups:
            group["lr"] = lr * group["lr_scale"]
        self.lr = lr
        self.model.prior_scale = min(1.0, (self.step + 1) / t_cfg.warmup_steps) if t_cfg.warmup_steps else 1.0
        ids_all, mask_all = self.batches.next()  # the global batch, the same rows on every rank
        t_all, weights_all = self.timesteps.sample(ids_all.shape[0], self.noise_gen)
        learns = self.timesteps.learns
        row_losses = torch.zeros(ids_all.shape[0], device=self.dev) if learns else None  # this rank's rows filled
        noise_all = draw_noise(
            (*ids_all.shape, self.config.model.hidden_dim), dp_weight > 0, self.noise_gen, self.dev, **option_draws(self.config)
        )
        self.opt.zero_grad(set_to_none=True)
        accum = t_cfg.grad_accum
        for k in range(accum):  # micro-step k of this rank: rows of chunk k·world + rank
            rows = slice((k * world + rank) * micro, (k * world + rank + 1) * micro)
            ids, mask = ids_all[rows].to(self.dev, non_blocking=True), mask_all[rows].to(self.dev, non_blocking=True)
            last = k == accum - 1
            with self.ddp.no_sync() if (self.ddp is not None and not last) else nullcontext():  # all-reduce once, on the last
                with autocast(self.dev, self.precision):
                    hold = held_end(ids, mask, self.pad) if self.config.model.needs_hold else None
                    terms = (self.ddp or self.objective)(
                        ids, mask, t_all[rows], noise_all[rows], self.alpha_bar, dp_weight, self.window, t_cfg.dp_partner, hold
                    )
                    per_row = terms["loss"] if weights_all is None else terms["loss"] * weights_all[rows]
                    loss = per_row.mean() / accum  # DDP averages over ranks: the global-batch mean
                self.scaler.scale(loss).backward()
            for name, v in terms.items():
                self.sums[name] = self.sums.get(name, 0.0) + v.detach().float().mean() / accum
            if learns:  # the loss of the noise: the classifier's cross-entropy, not the length head's
                row_losses[rows] = terms.get("ce", terms["loss"]).detach().float()
        if learns:  # the loss-aware sampler sees the whole global batch on every rank
            self.timesteps.update(t_all, dist.all_sum(row_losses) if world > 1 else row_losses)
        self.scaler.unscale_(self.opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t_cfg.grad_clip if t_cfg.grad_clip > 0 else float("inf"))
        self.scaler.step(self.opt)
        self.scaler.update()
        self.step += 1
        finite = torch.isfinite(loss.detach())
        if not self.scaler.is_enabled():  # with fp16's scaler an inf gradient is expected: that step is skipped, the scale lowered
            finite = finite & torch.isfinite(grad_norm.detach())
        self.bad_step = torch.where((self.bad_step < 0) & ~finite, self.step, self.bad_step)
        ema_update(self.ema, self.model, min(t_cfg.ema_decay, (1 + self.step) / (10 + self.step)))
        self.sums["grad_norm"] = self.sums.get("grad_norm", 0.0) + grad_norm.detach().float()
        self.window_steps += 1

    def log_record(self) -> dict[str, Any]:
        """The log window's mean of every term over the global batch (the one host sync of a log step); resets the window."""
        now = time.perf_counter()
        _check_finite(self.step, self.bad_step, self.sums)
        names = list(self.sums)
        means = dist.all_mean(torch.stack([self.sums[k] for k in names]) / self.window_steps).tolist()  # over ranks
        tokens = self.t_cfg.batch_size * self.config.model.seq_len * self.window_steps
        record = {
            "step": self.step,
            **dict(zip(names, means)),
            "lr": self.lr,
            "tokens_per_s": tokens / max(now - self.window_start, 1e-9),
            "elapsed_s": self.elapsed_before + now - self.start,
        }
        self.sums, self.window_start, self.window_steps = {}, now, 0
        return record

    def save(self, run_dir: Path, emit: Callback, keep: int) -> None:
        """A checkpoint of the full state (never of NaN weights); every rank's dropout stream goes with it."""
        _check_finite(self.step, self.bad_step, self.sums, self.model, self.ema)
        rngs = dist.all_gather_object(_rng_state())
        if dist.is_main():
            state = {
                "optimizer": self.opt.state_dict(),
                "step": self.step,
                "rng": rngs[0],
                "data": self.batches.position(),
                "elapsed": self.elapsed(),
                "noise_rng": self.noise_gen.get_state(),
                "timesteps": self.timesteps.state_dict(),
                "log_window": {"sums": {k: torch.as_tensor(v).detach().cpu() for k, v in self.sums.items()}, "steps": self.window_steps},
            }
            if self.world > 1:
                state["rng_ranks"] = rngs
            if self.scaler.is_enabled():
                state["scaler"] = self.scaler.state_dict()
            folder = ckpt.save_checkpoint(run_dir, self.step, self.model.state_dict(), self.ema.state_dict(), state, keep=keep)
            emit("save", {"step": self.step, "path": str(folder)})
        dist.barrier()
