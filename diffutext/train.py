"""A training run, top to bottom (method.md §1, §3).

`train(config, run_dir)` prepares the data and tokenizer (and the copy lexicon), then drives a
`trainer.Trainer` (the denoiser and its EMA copy, AdamW with warm-up, gradient clipping and,
optionally, the Distance Penalty) step by step. It writes
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

import random
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from . import distributed as dist
from . import plm
from .config import COPY_OVERLAP, RunConfig, with_vocab
from .data import tokenizer as tok
from .data.batches import Packed, choose_seq_len, pack_split, source_overlap
from .data.tasks import MissingSplit, load_split
from .data.tasks import resolve as resolve_task
from .device import resolve_device
from .lexicon import LEXICON_MIN_COUNT, build_lexicon, ibm1_lexicon
from .lock import run_lock
from .model import count_parameters
from .trainer import (
    Data,
    Trainer,
    TrainError,
)

Callback = Callable[[str, dict[str, Any]], None]
LIMITS = ("max_steps", "max_minutes")  # what a resumed run takes from the command that resumes it


def post_training_diffusion(init_from: str, given: dict[str, Any]) -> dict[str, Any]:
    """The diffusion fields of a run started from `init_from`'s weights: the initial run's, but for those `given`."""
    return {**ckpt.read_config(Path(init_from)).diffusion.__dict__, **given}


def resumed_config(stored: RunConfig, limits: dict[str, Any]) -> RunConfig:
    """A resumed run keeps its stored config; only its step and time limits may be given again."""
    return replace(stored, train=replace(stored.train, **{k: v for k, v in limits.items() if k in LIMITS}))


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
    if config.model.copy_lexicon > 0 and prior is None and not config.train.init_from:  # a resumed or post-trained run has its own
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
