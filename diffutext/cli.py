"""The command line: `diffutext train | sample | evaluate | ablate`: parse, delegate, show.

Each command turns its options (declared once in options.py) into configs, calls the engine and
hands the result to views.py, which draws it with rich. Heavy imports (torch, datasets) happen
inside the commands so `--help` answers at once. Exit codes: 0 success, 2 bad usage or bad input
(one line on stderr), 1 unexpected failure (a NaN loss, a full disk: one line too). `train` stops
gracefully on SIGINT/SIGTERM (a checkpoint, then exit 130/143 with the command that resumes).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from . import options as o
from .config import load_toml, resolve
from .errors import OneLineErrors, fail, run_guarded
from .views import err, out

RUNS_DIR = Path("runs")


app = typer.Typer(cls=OneLineErrors, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)


def _is_main_rank() -> bool:  # without torch: distributed.env_rank reads the same variable
    return os.environ.get("RANK", "0") == "0"


def _version(value: bool) -> None:
    if value:
        from . import __version__

        out.print(f"diffutext {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print diffutext's version and exit.")
    ] = False,
) -> None:
    """Continuous diffusion for sequence-to-sequence text: DiffuSeq + Distance Penalty + Adaptive Decay Sampling."""


# ---------------------------------------------------------------- train


@app.command()
@o.command(o.TRAIN_FLAGS, o.TRAIN_RUN)
def train(opts: dict[str, Any] = None) -> None:
    """Train a diffusion model (with no options: the embedded bible-basic task, small preset)."""
    resume, preset, given = opts["resume"], opts["preset"], opts[o.GIVEN]
    if resume and opts["out_dir"] is None:
        fail("--resume needs --out RUN_DIR (the run to continue)")
    if resume and opts["overwrite"]:
        fail("give --resume (continue the run) or --overwrite (replace it), not both")
    if opts["overwrite"] and opts["out_dir"] is None:
        fail("--overwrite replaces the run folder given by --out; without --out every run gets a new folder")
    overrides = o.config_overrides(opts)
    if opts["config"] is not None:
        data = run_guarded(load_toml, opts["config"])
        file_preset = data.pop("preset", None)
        preset = preset if ("preset" in given or file_preset is None) else file_preset  # a flag wins over the file
        for section, values in data.items():
            overrides[section] = {**values, **overrides[section]}  # flags win over the file
    if opts["max_steps"] is not None and opts["max_minutes"] is None:
        overrides["train"]["max_minutes"] = 0.0  # an explicit step count is the budget: the preset's minutes no longer cut it short
    if overrides["train"].get("init_from") and not resume:  # post-training keeps the initial run's diffusion but for flags given
        from .train import post_training_diffusion

        overrides["diffusion"] = run_guarded(post_training_diffusion, overrides["train"]["init_from"], overrides["diffusion"])
    if overrides["train"].get("init_from") and not resume and overrides["model"]:
        fail(
            f"--init-from keeps its run's network; {', '.join(o.flag(n) for n in sorted(overrides['model']))} cannot change it "
            "(start a fresh run for another network)"
        )
    cfg = run_guarded(resolve, preset, overrides)
    if not resume:
        _check_train_flags(cfg, given)
    from .data.tasks import check_task, is_folder_task

    run_guarded(check_task, cfg.train.task, cfg.train.data_dir, cfg.train.train_split)
    label = Path(cfg.train.task).name if is_folder_task(cfg.train.task) else cfg.train.task
    run_dir = opts["out_dir"] or RUNS_DIR / f"{label}-{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    if resume and (run_dir / "config.json").is_file():  # the run's own limits hold unless given again
        from .checkpoint import read_config
        from .train import resumed_config

        stored = run_guarded(read_config, run_dir)
        _check_resume_flags(stored, cfg, overrides, given)
        cfg = resumed_config(stored, overrides["train"])
    _train(cfg, run_dir, opts)


def _check_resume_flags(stored, cfg, overrides: dict[str, dict[str, Any]], given: set[str]) -> None:
    """A resumed run keeps its stored settings (as fairseq's and HF's resumes): a setting flag is accepted only where
    it repeats the stored value (the first command run again with --resume), --preset/--config only where they
    resolve to the stored network and process; anything else is refused with one line."""
    from .train import LIMITS

    changed = {
        o.flag(f.flag or f.name)
        for f in o.TRAIN_FIELDS
        if f.name not in LIMITS
        and f.name in overrides[f.section]
        and getattr(getattr(stored, f.section), f.name) != overrides[f.section][f.name]
    }
    from dataclasses import replace

    model = replace(cfg.model, vocab_size=stored.model.vocab_size) if cfg.model.vocab_size == 0 else cfg.model  # 0: the tokenizer's
    if given & {"preset", "config"} and (model != stored.model or cfg.diffusion != stored.diffusion):
        changed |= {o.flag(n) for n in given & {"preset", "config"}}
    if changed:
        fail(
            f"--resume continues a run with its stored settings; {', '.join(sorted(changed))} cannot change them (only "
            f"--max-steps, --max-minutes, --keep, --device, --compile and --detect-anomaly may be given again; "
            f"to train on from its weights with other settings, start a new run with --init-from)"
        )


def _check_train_flags(cfg, given: set[str]) -> None:
    """Refuse a flag the configuration would ignore."""
    t = cfg.train
    if t.distance_penalty == 0:
        idle = sorted(o.flag(n) for n in given & {"dp_window", "dp_partner", "dp_window_ends", "dp_from"})
        if idle:
            fail(f"{', '.join(idle)} shape(s) the Distance Penalty, which is off: give --distance-penalty λ > 0 too")
    if t.anchor_weight == 0 and "anchor_smoothing" in given:
        fail("--anchor-smoothing smooths the anchor loss, which is off: give --anchor-weight > 0 too")
    m = cfg.model
    if "lexicon_model" in given and not (m.copy_lexicon > 0 and (m.copy_source != "off" or m.copy_input)):
        fail("--lexicon-model counts the copy lexicon, which is off: give --copy-lexicon > 0 with --copy-input or --copy-source")


def _train(cfg, run_dir: Path, opts: dict[str, Any]) -> None:
    """The engine's training under the signal handlers, the --overwrite guard and this process's allocator policy."""
    from contextlib import ExitStack

    from .allocator import limit_heap_fragmentation
    from .checkpoint import replacing
    from .device import resolve_device
    from .interrupt import StopSignals
    from .lock import run_lock
    from .train import train as train_run
    from .views import TrainView

    device, keep = opts["device"], opts["keep"]
    if run_guarded(resolve_device, device).type == "cpu":
        limit_heap_fragmentation()  # freed activations go back to the system (allocator.py)
    resume_cmd = " ".join(
        ["diffutext", "train", "--out", shlex.quote(str(run_dir)), "--resume"]
        + (["--keep", str(keep)] if keep else [])
        + (["--device", shlex.quote(device)] if device != "auto" else [])
    )
    last_step = [0]
    with ExitStack() as stack:
        if _is_main_rank():  # the writer lock first: a second writer must not even move a folder aside
            run_guarded(stack.enter_context, run_lock(run_dir))
        committed = run_guarded(stack.enter_context, replacing(run_dir, err.print)) if opts["overwrite"] else (lambda: None)
        stop, view = stack.enter_context(StopSignals()), stack.enter_context(TrainView())

        def on_event(event: str, info: dict[str, Any]) -> None:
            view(event, info)
            last_step[0] = info.get("step", last_step[0])
            if event == "save":
                committed()  # the new run has a checkpoint: a replaced one can go

        try:
            run_guarded(
                train_run,
                cfg,
                run_dir,
                resume=opts["resume"],
                device=device,
                callback=on_event,
                keep=keep,
                should_stop=stop.requested,
                compile=opts["compile"],
                detect_anomaly=opts["detect_anomaly"],
            )
        except KeyboardInterrupt:
            err.print(
                f"stopped at once by a second {stop.name or 'SIGINT'}, no checkpoint of the current step; "
                f"resume from the last one with: {resume_cmd}",
                markup=False,
            )
            raise typer.Exit(stop.exit_code if stop.signum else 130) from None
    if stop.requested():
        err.print(f"stopped by {stop.name} at step {last_step[0]}, checkpoint saved; resume with: {resume_cmd}", markup=False)
        raise typer.Exit(stop.exit_code)
    out.print(f"run folder: {run_dir}")


# ---------------------------------------------------------------- sample, evaluate, ablate


def _open(checkpoint: Optional[Path], weights: str, device: str, step: Optional[int] = None):
    from .checkpoint import newest_run
    from .device import resolve_device
    from .distributed import setup
    from .evaluate import load_model

    run_dir = checkpoint if checkpoint is not None else run_guarded(newest_run, RUNS_DIR)
    dev = setup(run_guarded(resolve_device, device))  # under torchrun: join the group, one GPU per rank
    return run_guarded(load_model, run_dir, weights, dev, step)


def _inputs(loaded, opts: dict[str, Any]):
    """The Dataset to decode: --text, --input FILE.jsonl, or a split of the run's task; the first --limit of it."""
    from .data.jsonl import Rows
    from .data.tasks import eval_dataset, load_eval_split, read_inputs

    text = opts.get("text")
    if text is not None and opts["input_file"] is not None:
        fail("give either --text or --input, not both")
    if text is not None:
        if not text.strip():
            fail("--text is empty")
        ds = eval_dataset(Rows([text], [[]]))
    elif opts["input_file"] is not None:
        ds = run_guarded(read_inputs, opts["input_file"])
    else:
        t_cfg = loaded.checkpoint.config.train
        ds = run_guarded(load_eval_split, t_cfg.task, opts["split"], t_cfg.data_dir)
    limit = opts["limit"]
    return ds if limit is None else ds.select(range(min(limit, len(ds))))


@contextmanager
def _decoding(label: str, keep):
    """A decode's progress view under SIGINT/SIGTERM: a signal stops it after the batch (or cell) in hand, what is
    finished stays in `keep`, and the command that continues is printed."""
    from .interrupt import Stopped, StopSignals
    from .views import DecodeView

    with StopSignals() as stop, DecodeView(label) as view:

        def on_event(event: str, info: dict[str, Any]) -> None:
            view(event, info)
            if event in ("batch_done", "cell_done") and stop.requested():  # between pieces: the finished ones are kept
                raise Stopped

        try:
            yield on_event
        except Stopped:
            kept = f"; finished work is kept in {keep.folder}" if keep is not None else ""
            err.print(f"stopped by {stop.name}{kept}; continue with: {shlex.join(['diffutext', *sys.argv[1:]])}", markup=False)
            raise typer.Exit(stop.exit_code) from None


def _check_sampling(opts: dict[str, Any], samplers: list[str]) -> None:
    """Refuse a decoding option none of the chosen samplers would read."""
    from .samplers import SAMPLERS, UPDATES, ddim_update, ddpm_update

    given = opts[o.GIVEN]
    updates = {UPDATES[opts["update"]] if opts["update"] else SAMPLERS[name].update for name in samplers}
    if "ads_shares" in given and "ads" not in samplers:
        fail("--ads-shares sets ADS's step shares: decode with --sampler ads")
    if "eta" in given and ddim_update not in updates:
        fail("--eta is DDIM's: decode with --sampler ddim or --update ddim")
    if "variance" in given and ddpm_update not in updates:
        fail("--variance is the ancestral update's: decode with --sampler ddpm, uniform or ads (or --update ddpm)")
    if "clamp_by" in given and not opts["clamp"]:
        fail("--clamp-by says how clamping snaps x0_hat; with --no-clamp nothing is snapped")


def _decode(loaded, ds, cfg, keep=None):
    from .evaluate import decode
    from .samplers import make_sampler

    # Said only once the inputs and the sampler are known good, so that bad input still gets exactly one line.
    sampler = run_guarded(make_sampler, cfg.sampler, cfg.update, cfg.variance, cfg.eta, cfg.ads_shares)
    run_guarded(sampler.timesteps, loaded.checkpoint.config.diffusion.T, cfg.steps)
    err.print(f"checkpoint {loaded.checkpoint.folder} (step {loaded.checkpoint.step}, {cfg.weights} weights)")
    with _decoding(f"{cfg.sampler}-{cfg.steps}", keep) as on_event:
        decoded = run_guarded(decode, loaded, ds, cfg, on_event, keep)
    if decoded.truncated:
        err.print(f"warning: {decoded.truncated} of {len(ds)} sources are longer than the model's sequence allows and were truncated")
    return decoded


def _partial(path: Optional[Path]):
    """Where the finished batches of a decode whose output goes to `path` wait for the rest (None: not kept)."""
    from .pieces import Pieces

    return None if path is None else Pieces(path.with_name(f".{path.name}.partial"))


def _label(cfg, decoded, n: int) -> str:
    cedi = f", CEDI {decoded.cedi:g}" if decoded.cedi is not None else ""
    cedi += ", repeats dropped" if cfg.dedup else ""
    cedi += f", copy diagonal {decoded.copy_diagonal:g}" if decoded.copy_diagonal else ""
    return f"{cfg.sampler}-{decoded.steps} steps{cedi}" + (f", MBR of {cfg.seeds}" if cfg.seeds > 1 else "") + f" on {n} sentences"


def _write(path: Path, text: str) -> None:
    """Write an output file atomically (a failed write keeps the previous file); its path in any error."""
    from .atomic import atomic_write

    def write() -> None:
        try:
            atomic_write(path, text.encode("utf-8"))
        except OSError as e:
            raise OSError(e.errno, f"cannot write ({e.strerror or e})", str(path)) from None

    run_guarded(write)
    err.print(f"wrote {path}")


@app.command()
@o.command(o.SAMPLER, o.INPUTS, o.SAMPLE_OUTPUT, o.SAMPLING, [o.DEVICE])
def sample(opts: dict[str, Any] = None) -> None:
    """Generate text with a trained run; print examples and, when references are known, the metrics."""
    from .data.tasks import references
    from .evaluate import diffuseq_seed_files, predictions_jsonl, scores
    from .views import examples, metrics_table

    if "format" in opts[o.GIVEN] and opts["out_file"] is None:
        fail("--format says what --out holds: give --out too")
    diffuseq = opts["format"] == "diffuseq"
    if diffuseq and opts["out_file"].exists() and not opts["out_file"].is_dir():
        fail(f"--format diffuseq writes a folder of seed files; {opts['out_file']} is a file")
    _check_sampling(opts, [opts["sampler"]])
    cfg = o.sample_config(opts)
    loaded = _open(opts["checkpoint"], cfg.weights, opts["device"], opts["step"])
    text, out_file, show = opts["text"], opts["out_file"], opts["show"]
    ds = _inputs(loaded, opts)
    keep = _partial(out_file)
    decoded = _decode(loaded, ds, cfg, keep)
    if not _is_main_rank():  # every rank decoded its share; rank 0 reports
        return
    srcs, refs = ds["src"], references(ds)
    if diffuseq:
        run_guarded(out_file.mkdir, parents=True, exist_ok=True)
        for name, text in diffuseq_seed_files(srcs, refs, decoded).items():
            _write(out_file / name, text)
        keep.clear()
    elif out_file is not None:
        _write(out_file, predictions_jsonl(srcs, refs, decoded))
        keep.clear()
    examples(srcs, refs, decoded.hyps, show)
    if text is not None and show == 0:
        out.print(decoded.hyps[0])
    if all(refs):
        out.print(metrics_table(_label(cfg, decoded, len(ds)), scores(decoded, refs, cfg.seeds)))
    else:
        err.print(f"{_label(cfg, decoded, len(ds))} in {decoded.seconds:.1f} s")


@app.command()
@o.command(o.EVALUATE, o.SAMPLER, o.INPUTS, o.SAMPLING, [o.DEVICE])
def evaluate(opts: dict[str, Any] = None) -> None:
    """Score predictions (a file, DiffuSeq's decoded files) or a run decoded on the spot: the standard metrics and DiffuSeq's set."""
    from .data.tasks import references
    from .evaluate import score_predictions, scores
    from .views import metrics_table

    predictions, json_file, bertscore_model, script = (
        opts["predictions"],
        opts["json_file"],
        opts["bertscore_model"],
        opts["diffuseq_script"],
    )
    if predictions is not None:
        decoding = sorted(o.flag(p.name) for p in o.SAMPLER + o.INPUTS + o.SAMPLING + [o.DEVICE] if p.name in opts[o.GIVEN])
        if decoding:
            fail(f"evaluate FILE scores the file as it is: {', '.join(decoding)} decode(s) a run (give --checkpoint RUN, not a file)")
        if bertscore_model is not None and predictions.is_dir() and not opts["mbr"]:
            fail("--bertscore-model scores one output per source: give --mbr with a folder of DiffuSeq seed files")
        title, result, hyps, refs = run_guarded(score_predictions, predictions, opts["mbr"], script)
        extra: dict[str, Any] = {"predictions": str(predictions)}
    else:
        _check_sampling(opts, [opts["sampler"]])
        cfg = o.sample_config(opts)
        loaded = _open(opts["checkpoint"], cfg.weights, opts["device"], opts["step"])
        ds = _inputs(loaded, opts)
        refs = references(ds)
        if not all(refs):
            fail("these inputs have no references ('trg') to score against")
        keep = _partial(json_file)
        decoded = _decode(loaded, ds, cfg, keep)
        if not _is_main_rank():
            return
        hyps, result, title = decoded.hyps, scores(decoded, refs, cfg.seeds, script), _label(cfg, decoded, len(ds))
        extra = {
            "checkpoint": str(loaded.checkpoint.folder),
            "sampler": cfg.sampler,
            "steps": decoded.steps,
            "seeds": cfg.seeds,
            "precision": decoded.precision,
            "cedi": decoded.cedi,
            "dedup": cfg.dedup,
            "copy_diagonal": decoded.copy_diagonal,
        }
    if bertscore_model is not None:
        from .metrics import bertscore

        f1, label = run_guarded(bertscore, hyps, refs, bertscore_model)
        result.update({"bertscore_f1": f1, "bertscore_model": label})
    out.print(metrics_table(title, result))
    if json_file is not None:
        _write(json_file, json.dumps({**extra, **result}, indent=2) + "\n")
        if predictions is None:
            keep.clear()


@app.command()
@o.command(o.ABLATE, [o.SPLIT, o.INPUT], o.SAMPLING, [o.DEVICE])
def ablate(opts: dict[str, Any] = None) -> None:
    """Checkpoints × samplers × steps: quality and wall time side by side, saved as CSV, JSON and PNG plots."""
    from . import ablation
    from .data.tasks import references
    from .diffusion import sigma
    from .pieces import Pieces, fingerprint
    from .views import ablation_table

    _check_sampling(opts, opts["samplers"])
    if opts["input_file"] is not None and "split" in opts[o.GIVEN]:
        fail("give --split (of the run's task) or --input FILE, not both")
    base = o.sample_config(opts)
    opened = [
        (str(c) if c is not None else None, _open(c, base.weights, opts["device"], opts["step"])) for c in (opts["checkpoints"] or [None])
    ]
    opened = [(label or str(run.checkpoint.run_dir), run) for label, run in opened]
    first = opened[0][1]
    T = first.checkpoint.config.diffusion.T
    if any(run.checkpoint.config.diffusion.T != T for _, run in opened):
        fail("all checkpoints of one ablation must share the diffusion T")
    ds = _inputs(first, opts)
    if not all(references(ds)):
        fail(f"{opts['input_file'] or 'this split'} has no references ('trg') to score against")
    where = str(opts["input_file"]) if opts["input_file"] is not None else opts["split"]
    cells = run_guarded(ablation.grid, opts["samplers"], opts["step_counts"], T, base)
    labels = [label for label, _ in opened]
    folder = opts["out_dir"] or (
        first.checkpoint.run_dir / "ablate" if len(opened) == 1 else RUNS_DIR / f"ablate-{fingerprint(labels)[:8]}"
    )
    keep, reused = Pieces(folder / ".cells.partial"), []
    with _decoding("ablate", keep) as on_event:

        def count(event: str, info: dict[str, Any]) -> None:
            if event == "cell_reused":
                reused.append(info)
            on_event(event, info)

        rows = run_guarded(ablation.run, opened, ds, cells, base, count, keep)
    if reused:
        err.print(f"reused {len(reused)} of {len(cells) * len(opened)} cells finished by an earlier run of this grid ({keep.folder})")
    if not _is_main_rank():  # every rank decoded its share; rank 0 reports and writes
        return
    marks = ablation.best(rows)
    for label in labels:
        out.print(ablation_table(rows, marks, label, where, len(ds), base.seeds))
    meta = {"split": where, "sentences": len(ds), "seeds": base.seeds, "T": T, "sample_config": base.__dict__}
    paths = run_guarded(ablation.write, folder, rows, sigma(first.alpha_bar.cpu()).tolist(), meta)
    keep.clear()
    err.print("wrote " + ", ".join(str(p) for p in paths))


@app.command("import-diffuseq")
@o.command(o.IMPORT)
def import_diffuseq(opts: dict[str, Any] = None) -> None:
    """Turn a DiffuSeq model folder (training_args.json, ema_*.pt, its vocabulary) into a run folder every command takes."""
    from . import import_diffuseq as imp
    from . import views

    views.imported(
        run_guarded(
            imp.import_diffuseq, opts["source"], opts["out_dir"], task=opts["task"], tokenizer=opts["tokenizer"], heads=opts["heads"]
        )
    )


@app.command()
def env() -> None:
    """Print what diffutext runs on: the versions, the device auto picks, the precision auto resolves to, threads."""
    import importlib.metadata as md
    import platform

    import torch

    from .device import resolve_device, resolve_precision

    rows = [("python", platform.python_version())]
    for name in ("diffutext", "torch", "typer", "rich", "datasets", "tokenizers", "safetensors", "sacrebleu", "rouge-score", "nltk"):
        try:
            rows.append((name, md.version(name)))
        except md.PackageNotFoundError:
            rows.append((name, "not installed"))
    device = resolve_device("auto")
    rows.append(("device (auto)", str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")))
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native = False
    rows.append(("CPU multiplies bf16 natively", "yes" if native else "no"))
    rows.append(("precision auto resolves to", resolve_precision("auto", device)))
    rows.append(("torch threads", str(torch.get_num_threads())))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        out.print(f"{key.ljust(width)}  {value}", highlight=False)


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
