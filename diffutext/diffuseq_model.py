"""DiffuSeq's denoiser (Shark-NLP/DiffuSeq `TransformerNetModel`), in our own code (method.md §1): `arch = "diffuseq"`.

The same network as DiffuSeq's, module for module and under DiffuSeq's parameter names, so that a DiffuSeq
state dict loads as it is (`import_diffuseq.py`); no DiffuSeq or `transformers` code runs:

  x0_hat = down(encoder(dropout(LayerNorm(up(z_t) + P[:L] + time_embed(sinusoid(t · 1000 / T))))))

- `up` (input_up_proj) = Linear(hidden_dim, W), Tanh, Linear(W, W); `down` (output_down_proj) = Linear(W, W), Tanh,
  Linear(W, hidden_dim); both are absent (identity) when hidden_dim == W, as there.
- `time_embed` = Linear(time_dim, 4·time_dim), SiLU, Linear(4·time_dim, W) over the sinusoid of the rescaled
  timestep t·1000/T (DiffuSeq's `rescale_timesteps`, on in its config); diffutext's own model feeds t unscaled.
- the encoder (`input_transformers`) is BERT's: post-LayerNorm blocks, h = LN(h + dropout(O·attn(h))),
  h = LN(h + dropout(W2·gelu(W1·h))), exact (erf) GELU, LayerNorm eps 1e-12, no attention mask; attention
  dropout 0.1 (bert-base-uncased's, which DiffuSeq does not override), hidden dropout `config.dropout`.
- the head is tied to the word embedding: logits = x·Eᵀ + b (`lm_head.bias`; DiffuSeq's `lm_head.weight` is E).
- DiffuSeq-v2's learned mean embedding (`mean_embed`) is held as `mask_state` when the config has an absorbing state.

It answers the interface the engine uses (`embed`, `logits`, `embedding`, `head_bias`, `forward(z_t, t)`), so
training, every sampler and the losses take it as they take `model.Denoiser`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig

ATTENTION_DROPOUT = 0.1  # bert-base-uncased's attention_probs_dropout_prob, kept by DiffuSeq
LN_EPS = 1e-12  # BERT's layer_norm_eps


def sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """DiffuSeq's timestep_embedding of (possibly fractional) timesteps: [cos(t·f), sin(t·f)], (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    out = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.cat([out, torch.zeros_like(out[:, :1])], dim=-1) if dim % 2 else out


class _SelfAttention(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)


class _Dense(nn.Module):
    """A Linear followed (in `output` modules) by dropout, the residual and a LayerNorm, as BERT names them."""

    def __init__(self, n_in: int, n_out: int, norm: bool):
        super().__init__()
        self.dense = nn.Linear(n_in, n_out)
        if norm:
            self.LayerNorm = nn.LayerNorm(n_out, eps=LN_EPS)


class _Attention(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.self = _SelfAttention(width)
        self.output = _Dense(width, width, norm=True)


class BertLayer(nn.Module):
    """One post-LayerNorm BERT block under BERT's parameter names."""

    def __init__(self, width: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.attention = _Attention(width)
        self.intermediate = _Dense(width, ffn, norm=False)
        self.output = _Dense(ffn, width, norm=True)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, L, W = h.shape
        sa = self.attention.self
        q, k, v = (m(h).view(B, L, self.heads, W // self.heads).transpose(1, 2) for m in (sa.query, sa.key, sa.value))
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=ATTENTION_DROPOUT if self.training else 0.0)  # (B, H, L, W/H)
        a = a.transpose(1, 2).reshape(B, L, W)
        out = self.attention.output
        h = out.LayerNorm(h + F.dropout(out.dense(a), self.dropout, self.training))
        f = self.output.dense(F.gelu(self.intermediate.dense(h)))
        return self.output.LayerNorm(h + F.dropout(f, self.dropout, self.training))


class _Encoder(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(c.width, c.heads, c.ffn, c.dropout) for _ in range(c.layers))


class _TiedHead(nn.Module):
    """DiffuSeq's lm_head without its weight, which is the word embedding: only the bias is its own."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(vocab_size))


def _projection(n_in: int, n_out: int, width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(n_in, width), nn.Tanh(), nn.Linear(width, n_out))


class DiffuSeqDenoiser(nn.Module):
    """DiffuSeq's TransformerNetModel (see the module docstring); `T` is the diffusion steps t is rescaled by."""

    def __init__(self, config: ModelConfig, T: int = 2000):
        super().__init__()
        if config.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set (from the tokenizer) before building the model")
        c = self.config = config
        self.T = T
        self.word_embedding = nn.Embedding(c.vocab_size, c.hidden_dim)
        self.lm_head = _TiedHead(c.vocab_size)
        self.time_embed = nn.Sequential(nn.Linear(c.time_dim, 4 * c.time_dim), nn.SiLU(), nn.Linear(4 * c.time_dim, c.width))
        if c.hidden_dim != c.width:
            self.input_up_proj = _projection(c.hidden_dim, c.width, c.width)
            self.output_down_proj = _projection(c.width, c.hidden_dim, c.width)
        self.input_transformers = _Encoder(c)
        self.position_embeddings = nn.Embedding(c.seq_len, c.width)
        self.LayerNorm = nn.LayerNorm(c.width, eps=LN_EPS)
        if getattr(c, "absorbing", 0) > 0:  # DiffuSeq-v2's learned mean embedding (quality options' absorbing state)
            self.mask_state = nn.Parameter(torch.randn(c.hidden_dim) * c.hidden_dim**-0.5)

    @property
    def embedding(self) -> nn.Embedding:
        return self.word_embedding

    @property
    def head_bias(self) -> nn.Parameter:
        return self.lm_head.bias

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """E(w): (B, L) -> (B, L, hidden_dim)."""
        return self.word_embedding(ids)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Tied head: (..., hidden_dim) -> (..., vocab)."""
        return x @ self.word_embedding.weight.t() + self.lm_head.bias

    def forward(self, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0_hat = f(z_t, t): (B, L, hidden_dim), (B,) -> (B, L, hidden_dim); t is rescaled to t·1000/T."""
        L = z_t.shape[1]
        emb_t = self.time_embed(sinusoid(t.float() * (1000.0 / self.T), self.config.time_dim))
        emb_x = self.input_up_proj(z_t) if hasattr(self, "input_up_proj") else z_t
        h = self.position_embeddings.weight[:L] + emb_x + emb_t[:, None]
        h = F.dropout(self.LayerNorm(h), self.config.dropout, self.training)  # (B, L, W)
        for layer in self.input_transformers.layer:
            h = layer(h)
        out = self.output_down_proj(h) if hasattr(self, "output_down_proj") else h
        return out.to(z_t.dtype)
