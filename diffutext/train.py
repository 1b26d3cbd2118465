"""The training loop, top to bottom (method.md §1, §3).

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

`train` changes nothing about the process it runs in (the CLI sets the allocator policy of
`allocator.py` for CPU training; a library caller may do the same).
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from . import distributed as dist
from . import plm
from .config import COPY_OVERLAP, RunConfig, with_vocab
from .data import tokenizer as tok
from .data.batches import Packed, choose_seq_len, held_end, pack_split, source_overlap
from .data.tasks import MissingSplit, load_split
from .data.tasks import resolve as resolve_task
from .device import autocast, resolve_device, resolve_precision
from .diffusion import alpha_bar_table
from .lexicon import LEXICON_MIN_COUNT, build_lexicon, ibm1_lexicon
from .lock import run_lock
from .losses import LossOptions, diffusion_loss, dp_window, draw_noise
from .model import Denoiser, build_model, count_parameters
from .timesteps import make_timesteps

Callback = Callable[[str, dict[str, Any]], None]
LIMITS = ("max_steps", "max_minutes")  # what a resumed run takes from the command that resumes it


class TrainError(ValueError):
    """Bad training input (run folder, resume, init run); one clear line."""


def post_training_diffusion(init_from: str, given: dict[str, Any]) -> dict[str, Any]:
    """The diffusion fields of a run started from `init_from`'s weights: the initial run's, but for those `given`."""
    return {**ckpt.read_config(Path(init_from)).diffusion.__dict__, **given}


def resumed_config(stored: RunConfig, limits: dict[str, Any]) -> RunConfig:
    """A resumed run keeps its stored config; only its step and time limits may be given again."""
    return replace(stored, train=replace(stored.train, **{k: v for k, v in limits.items() if k in LIMITS}))


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


def prepare_vocab(config: RunConfig, run_dir: Path, resume: bool, train_ds) -> tok.Vocab:
    if resume:
        return ckpt.open_run(run_dir).vocab
    if config.train.init_from:
        vocab = ckpt.open_run(Path(config.train.init_from)).vocab
        if config.train.tokenizer and tok.load(config.train.tokenizer).to_str() != vocab.to_str():
            raise TrainError(
                f"--tokenizer {config.train.tokenizer} differs from the tokenizer of --init-from {config.train.init_from}; "
                "a post-trained run keeps its initial run's tokenizer (drop --tokenizer)"
            )
        return vocab
    if config.train.tokenizer:
        return tok.load(config.train.tokenizer)
    columns = train_ds[:]  # one read of both columns (column by column takes 100× longer on a large Arrow split)
    return tok.train(columns["src"] + columns["trg"], config.train.vocab_size, config.train.tokenizer_type)


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


def train(
    config: RunConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    device: str = "auto",
    callback: Callback | None = None,
    keep: int = 0,
    compile: bool = False,
    should_stop: Callable[[], bool] | None = None,
    detect_anomaly: bool = False,
) -> Path:
    """Train (or resume) a run; `should_stop()` is polled once per step and, when true, ends the run with a
    checkpoint (the caller decides why: a signal, a deadline); `detect_anomaly` runs autograd's anomaly mode.
    On resume the stored config holds, with `config`'s step and time limits (`resumed_config`). The run folder's
    writer lock (lock.py) is held throughout: a second writer fails at once with RunLocked."""
    writer = run_lock(run_dir) if dist.env_rank() == 0 else nullcontext()  # one writer per run folder: rank 0's lock
    with writer, torch.autograd.set_detect_anomaly(detect_anomaly):
        try:
            return _train(
                config, run_dir, resume=resume, device=device, callback=callback, keep=keep, compile=compile, should_stop=should_stop
            )
        except RuntimeError as e:
            if detect_anomaly and "nan" in str(e).lower():
                raise FloatingPointError(
                    f"autograd anomaly: {str(e).splitlines()[0].rstrip('.')}; training stopped, "
                    "no checkpoint written after it (the forward trace is printed above)"
                ) from e
            raise


def _train(
    config: RunConfig,
    run_dir: Path,
    *,
    resume: bool,
    device: str,
    callback: Callback | None,
    keep: int,
    compile: bool,
    should_stop: Callable[[], bool] | None,
) -> Path:
    dev = dist.setup(resolve_device(device))
    main = dist.is_main()
    run_dir = Path(dist.broadcast_object(str(run_dir)))  # rank 0's name (a default name holds the start time)
    emit = (callback or (lambda event, info: None)) if main else (lambda event, info: None)
    config, prior, restart = _start(config, run_dir, resume)
    Trainer.check_batch_split(config.train, dist.world())
    torch.manual_seed(config.train.seed)
    random.seed(config.train.seed)
    data, vocab, task_source = _load_data(config, run_dir, prior is not None, emit)
    config = with_vocab(config, vocab.size)
    if config.model.seq_len == 0:  # chosen from the data: stored in the run's config like any other size
        config = replace(config, model=replace(config.model, seq_len=data.train.ids.shape[1]))
    if config.model.copy_source == "auto":  # chosen from the data too, and stored as on or off
        config = resolve_copy_source(config, source_overlap(data.train, vocab), emit)
    if config.model.copy_lexicon and not config.model.needs_ids:  # nothing copied, nothing to translate
        config = replace(config, model=replace(config.model, copy_lexicon=0.0))
    trainer = Trainer(config, dev, data, compile, init=prior is None, pad=vocab.pad)
    if config.train.init_plm and prior is None:
        m = config.model
        emit(
            "choice",
            {
                "message": f"network initialised from {config.train.init_plm} ({plm.folder(config.train.init_plm)}): "
                f"{m.layers} BERT layers of width {m.width}, its word embedding as the diffusion space"
            },
        )
    if config.model.needs_ids and prior is None and not config.train.init_from:  # a resumed or post-trained run has its own
        trainer.set_lexicon(count_lexicon(data.train, vocab, config.model.copy_lexicon, emit, config.model.lexicon_model))
    if prior is not None:
        trainer.restore(prior)
        if main:
            ckpt.truncate_log(run_dir, trainer.step)
    elif main:
        ckpt.init_run(run_dir, config, vocab)
        if restart:
            ckpt.truncate_log(run_dir, 0)
    emit(
        "start",
        {
            "run_dir": str(run_dir),
            "parameters": count_parameters(trainer.model),
            "train_examples": len(data.train),
            "task_source": task_source,
            "truncated": data.train.truncated,
            "vocab_size": vocab.size,
            "max_steps": config.train.max_steps,
            "step": trainer.step,
            "device": str(dev),
            "world_size": dist.world(),
            "grad_accum": config.train.grad_accum,
            "precision": trainer.precision,
            "config": config.to_dict(),
        },
    )
    trainer.run(run_dir, emit, keep, should_stop)
    emit("end", {"step": trainer.step, "elapsed_s": trainer.elapsed(), "run_dir": str(run_dir)})
    return run_dir


def _start(config: RunConfig, run_dir: Path, resume: bool) -> tuple[RunConfig, ckpt.Checkpoint | None, bool]:
    """The config to train with, the checkpoint to resume (None for a new run) and whether a run killed before
    its first checkpoint is started over in place."""
    if resume and not ckpt.list_checkpoints(run_dir):
        if not (run_dir / "config.json").is_file():
            raise TrainError(f"--resume: {run_dir} is not a run folder (no config.json); nothing to resume")
        stored = resumed_config(ckpt.read_config(run_dir), {k: getattr(config.train, k) for k in LIMITS})
        return stored, None, True  # killed before its first checkpoint: start it over in place, with its stored config
    if resume:
        prior = ckpt.open_run(run_dir)
        if "imported_from" in prior.state():
            raise TrainError(
                f"--resume: {run_dir} was imported ({prior.state()['imported_from']}) and holds no training state; "
                f"start a new run from it with --init-from {run_dir}"
            )
        return resumed_config(prior.config, {k: getattr(config.train, k) for k in LIMITS}), prior, False

    def check_fresh() -> None:
        if run_dir.exists() and any(run_dir.iterdir()):
            raise TrainError(f"run folder {run_dir} already exists and is not empty; pass --resume to continue it or choose another --out")

    dist.main_first(check_fresh, TrainError)
    if config.train.init_plm:  # the network's sizes and the tokenizer are the pretrained encoder's
        config = plm.configure(config)
    if config.train.init_from:  # post-training: the network is the initial run's (its weights need it), whatever the preset says
        config = replace(config, model=ckpt.read_config(Path(config.train.init_from)).model)
    return config, None, False


def _load_data(config: RunConfig, run_dir: Path, resume: bool, emit: Callback) -> tuple[Data, tok.Vocab, str]:
    """The training (and validation) split packed with the run's tokenizer (rank 0 first: it fills the caches)."""
    t_cfg = config.train
    task_source = resolve_task(t_cfg.task, t_cfg.data_dir).describe()
    emit("status", {"message": f"loading task {task_source}"})
    if not dist.is_main():
        dist.barrier()  # rank 0 loads first and fills the datasets cache; the others then read it
    train_ds = load_split(t_cfg.task, t_cfg.train_split, t_cfg.data_dir)
    try:
        valid_ds = load_split(t_cfg.task, "valid", t_cfg.data_dir) if t_cfg.eval_every else None
    except MissingSplit:  # no validation split: train without validation loss (a broken one is an error)
        valid_ds = None
    if dist.is_main():
        dist.barrier()
    vocab = tok.from_str(dist.main_first(lambda: prepare_vocab(config, run_dir, resume, train_ds).to_str(), TrainError))
    seq_len, layout = config.model.seq_len or choose_seq_len(train_ds, vocab), config.model.layout  # 0: follow the data (nothing cut)
    data = Data(
        pack_split(train_ds, vocab, seq_len, layout=layout),
        pack_split(valid_ds, vocab, seq_len, layout=layout) if valid_ds is not None else None,
    )
    return data, vocab, task_source


def resolve_copy_source(config: RunConfig, overlap: float, emit: Callback) -> RunConfig:
    """copy_source auto: on when the training pairs' token overlap reaches COPY_OVERLAP and the model can take the
    prior (diffutext's network, x0_hat by regression); off otherwise."""
    m = config.model
    blocked = (
        "model.arch diffuseq has no copy prior"
        if m.arch == "diffuseq"
        else "model.x0_from classifier has no regressed x0_hat to add it to"
        if m.x0_from != "regression"
        else ""
    )
    on = overlap >= COPY_OVERLAP and not blocked
    why = f"the training pairs' token overlap is {overlap:.2f} ({'at least' if overlap >= COPY_OVERLAP else 'under'} {COPY_OVERLAP})"
    emit(
        "choice",
        {
            "message": f"copy prior {'on' if on else 'off'} (auto): {why}"
            + (f", but {blocked}" if blocked and overlap >= COPY_OVERLAP else "")
        },
    )
    return replace(config, model=replace(m, copy_source="on" if on else "off"))


def count_lexicon(train: Packed, vocab: tok.Vocab, share: float, emit: Callback, model: str = "position") -> torch.Tensor:
    """The copy prior's lexicon from the training split (`lexicon.build_lexicon`, or `ibm1_lexicon`), announced with a
    few of its entries."""
    count = ibm1_lexicon if model == "ibm1" else build_lexicon
    lex = count(train.ids[:], train.target_mask, vocab.size, share, [vocab.pad, vocab.cls, vocab.sep])
    changed = (lex != torch.arange(vocab.size)).nonzero().squeeze(1)
    top = changed[:6].tolist()
    shown = ", ".join(f"{a} → {b}" for a, b in zip(vocab.decode([[i] for i in top]), vocab.decode([[int(lex[i])] for i in top])))
    rule = f"t(e|f) at least {share:g}, IBM Model 1" if model == "ibm1" else f"share at least {share:g}"
    emit(
        "choice",
        {
            "message": f"copy lexicon: {len(changed)} source tokens copied as another token ({rule}, "
            f"at least {LEXICON_MIN_COUNT} occurrences){': ' + shown + ', …' if shown else ''}"
        },
    )
    return lex


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
