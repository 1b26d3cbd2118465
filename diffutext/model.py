"""The denoiser f(z_t, t) -> x0_hat and its tied word embedding (PAPER.md §1).

DiffuSeq's TransformerNetModel in a few lines: up-project the hidden_dim-wide embedding space to
the transformer width, add a learned position embedding and a sinusoidal timestep embedding
passed through an MLP, run a bidirectional encoder, down-project back to hidden_dim. The output
head is tied to the word embedding: logits = x · Eᵀ + bias.

Our choice (named): the encoder blocks are pre-LayerNorm and call PyTorch's fused
`scaled_dot_product_attention`; DiffuSeq uses a post-LN BERT encoder. Pre-LN trains stably at the
larger learning rates a CPU budget needs. While autograd records, a block runs the same maths
through `ops`, which keeps less than half the activations for backward (and draws dropout faster on CPU).
With `arch = "encdec"` the same blocks form an encoder of the clean source and a decoder of the target side
(SeqDiffuSeq's and Difformer's shape; `Denoiser.encode_decode`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .config import ModelConfig


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of integer timesteps: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Block(nn.Module):
    def __init__(self, width: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, ffn), nn.GELU(), nn.Linear(ffn, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """h (B, L, W); mask (B, 1, 1, L): the keys every position may read (None: all)."""
        lean = torch.is_grad_enabled() and not torch.compiler.is_compiling()  # torch.compile plans its own memory
        return self._forward_lean(h, mask) if lean else self._forward_plain(h, mask)

    def _forward_plain(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, L, W = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(B, L, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)  # 3×(B, H, L, W/H)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        h = h + self.drop(self.proj(a.transpose(1, 2).reshape(B, L, W)))
        return h + self.drop(self.mlp(self.norm2(h)))

    def _forward_lean(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The same block with the ops of `ops`, which save less for backward."""
        B, L, W = h.shape
        p, training = self.dropout, self.training
        q, k, v = ops.norm_linear(h, self.norm1, self.qkv).view(B, L, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        a = ops.attention(q, k, v, p, training, mask)
        h = h + ops.dropout(self.proj(a.transpose(1, 2).reshape(B, L, W)), p, training)
        return h + ops.dropout(ops.gelu_linear(ops.norm_linear(h, self.norm2, self.mlp[0]), self.mlp[2]), p, training)


class Denoiser(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set (from the tokenizer) before building the model")
        c = self.config = config
        if c.copy_source == "auto":
            raise ValueError("ModelConfig.copy_source auto must be resolved (on or off, from the training split) before building the model")
        self.embedding = nn.Embedding(c.vocab_size, c.hidden_dim)  # E, initialised N(0, 1) like DiffuSeq's
        self.head_bias = nn.Parameter(torch.zeros(c.vocab_size))
        # with self-conditioning the up-projection reads [z_t, x0_hat_prev] (SeqDiffuSeq's concatenation)
        # and with the copied input also the aligned source embedding (Gu et al. 2018's decoder input)
        inputs = 1 + (c.self_condition > 0) + c.copy_input
        self.up = nn.Sequential(nn.Linear(c.hidden_dim * inputs, c.width), nn.Tanh(),
                                nn.Linear(c.width, c.width))
        self.time_mlp = nn.Sequential(nn.Linear(c.time_dim, 4 * c.time_dim), nn.SiLU(), nn.Linear(4 * c.time_dim, c.width))
        self.position = nn.Embedding(c.seq_len, c.width)
        self.in_norm = nn.LayerNorm(c.width)
        self.blocks = nn.ModuleList(Block(c.width, c.heads, c.ffn, c.dropout) for _ in range(c.layers))
        self.out_norm = nn.LayerNorm(c.width)
        self.down = nn.Sequential(nn.Linear(c.width, c.width), nn.Tanh(), nn.Linear(c.width, c.hidden_dim))
        if c.absorbing > 0:  # DiffuSeq-v2's learned absorbing state m, initialised N(0, 1/hidden_dim) as there
            self.mask_state = nn.Parameter(torch.randn(c.hidden_dim) * c.hidden_dim ** -0.5)
        if c.positions == "segment":
            self.segment = nn.Embedding(2, c.width)  # source / target
        if c.needs_ids:  # the copy prior's lexicon, counted from the training split when training starts (identity here)
            self.register_buffer("lexicon", torch.arange(c.vocab_size))
        if c.copy_source == "on":  # the copy prior starts from the copy itself: the network's output is 0 until it learns
            nn.init.zeros_(self.down[2].weight)
            nn.init.zeros_(self.down[2].bias)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """E(w): (B, L) -> (B, L, hidden_dim)."""
        return self.embedding(ids)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Tied head: (..., hidden_dim) -> (..., vocab)."""
        return x @ self.embedding.weight.t() + self.head_bias

    def positional(self, L: int, target_mask: torch.Tensor | None) -> torch.Tensor:
        """What marks each position: (L, W) for "absolute" positions, or, for "segment" positions,
        (B, L, W): source positions 0, 1, … from [CLS], target positions 1, 2, … from the first target token
        (target token k where source token k is), plus the side's embedding. target_mask (B, L)."""
        if self.config.positions == "absolute":
            return self.position.weight[:L]
        idx = torch.arange(L, device=target_mask.device)
        start = target_mask.int().argmax(1, keepdim=True)  # the first target position (after [CLS] src [SEP])
        ids = torch.where(target_mask, (idx - start + 1).clamp(max=L - 1), idx)
        return self.position(ids) + self.segment(target_mask.long())

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, x0_prev: torch.Tensor | None = None,
                target_mask: torch.Tensor | None = None, with_head: bool = False, ids: torch.Tensor | None = None):
        """x0_hat = f(z_t, t): (B, L, hidden_dim), (B,) -> (B, L, hidden_dim).

        A self-conditioned model (config.self_condition > 0) also reads x0_prev, the previous estimate of x0
        (zeros when there is none, the default); any other model ignores it. A model with segment positions
        needs target_mask (B, L); any other ignores it. with_head: (x0_hat, h), where h is what the tied head
        reads as this prediction's logits (the anchor loss's input): x0_hat itself for "regression", the
        network's output before the softmax for "softmax". With the copy prior (config.copy_source) x0_hat is the
        network's output plus `copy_prior(z_t)`; with the copied input (config.copy_input) the network also reads it.
        A model with the lexicon (config.copy_lexicon) needs the token ids (B, L) too."""
        L = z_t.shape[1]
        if self.config.needs_target_mask and target_mask is None:
            raise ValueError("a model with segment positions, the copy prior, the copied input or arch encdec needs the target mask")
        c = self.config
        if c.needs_ids and ids is None:
            raise ValueError("a model with the copy prior's lexicon needs the token ids")
        copied = self.copy_prior(z_t, target_mask, ids) if c.copy_source == "on" or c.copy_input else None
        inputs = [z_t]
        if c.self_condition > 0:
            inputs.append(torch.zeros_like(z_t) if x0_prev is None else x0_prev.to(z_t.dtype))
        if c.copy_input:
            inputs.append(copied)
        h = self.up(torch.cat(inputs, -1) if len(inputs) > 1 else z_t)
        time = self.time_mlp(timestep_embedding(t, c.time_dim))[:, None]
        if c.arch == "encdec":  # the encoder reads no timestep: the source's encoding is the same at every step
            time = time * target_mask.unsqueeze(-1).to(time.dtype)
        h = h + self.positional(L, target_mask) + time
        h = ops.dropout(self.in_norm(h), self.config.dropout, self.training)  # (B, L, W)
        h = self.encode_decode(h, target_mask) if c.arch == "encdec" else self.run_blocks(h)
        h = self.down(self.out_norm(h))
        x0_hat = h if self.config.x0_from == "regression" else self.expected_embedding(h)
        if c.copy_source == "on":
            x0_hat = h = x0_hat + copied.to(x0_hat.dtype)
        return (x0_hat, h) if with_head else x0_hat

    def run_blocks(self, h: torch.Tensor) -> torch.Tensor:
        """The bidirectional encoder over the whole sequence (DiffuSeq's): (B, L, W) -> (B, L, W)."""
        for block in self.blocks:
            h = block(h)
        return h

    def encode_decode(self, h: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
        """arch encdec: the first layers // 2 blocks encode the source side ([CLS] src [SEP], reading only it),
        the others decode the target side. A decoder block's queries read the encoded source and the target side
        in one attention (cross- and self-attention in one softmax, over the block's own key and value
        projections); the source rows stay the encoder's output. (B, L, W), (B, L) -> (B, L, W)."""
        source = ~target_mask.unsqueeze(-1)  # (B, L, 1)
        keys = source.transpose(1, 2).unsqueeze(1)  # (B, 1, 1, L): the encoder reads the source side only
        n = len(self.blocks) // 2
        memory = h
        for block in self.blocks[:n]:
            memory = block(memory, keys)
        h = torch.where(source, memory, h)
        for block in self.blocks[n:]:
            h = torch.where(source, memory, block(h))
        return h

    def copy_prior(self, z_t: torch.Tensor, target_mask: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
        """What the copy prior adds (and the copied input reads): `copied_source(z_t)`, or with the lexicon the source
        embedding of lex(s) for each source token s (E(lex(s)) at the aligned target position); source positions keep z_t."""
        if not self.config.needs_ids:
            return self.copied_source(z_t, target_mask)
        source = self.embed(self.lexicon[ids]).to(z_t.dtype)  # only its source positions are read
        return torch.where(target_mask.unsqueeze(-1), self.copied_source(source, target_mask), z_t)

    @staticmethod
    def copied_source(z_t: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
        """The copy prior's starting point: at target position start + k − 1 (target token k) the input at source
        token k's position k, or at the source's [SEP] (position start − 1) once the source has ended; at source
        positions their own input (the unnoised source). (B, L, D), (B, L) -> (B, L, D)."""
        B, L, D = z_t.shape
        idx = torch.arange(L, device=z_t.device).expand(B, L)
        start = target_mask.int().argmax(1, keepdim=True)  # the first target position (after [CLS] src [SEP])
        aligned = torch.where(target_mask, torch.minimum(idx - start + 1, start - 1), idx)
        return z_t.gather(1, aligned[..., None].expand(B, L, D))

    def expected_embedding(self, h: torch.Tensor) -> torch.Tensor:
        """softmax(h·Eᵀ + b)·E: the embedding expected under the tied head's distribution (CDCD's score
        interpolation), in float32 over the vocabulary: (B, L, hidden_dim) -> (B, L, hidden_dim)."""
        weight = self.embedding.weight
        probs = torch.softmax(self.logits(h).float(), -1)
        return (probs.to(weight.dtype) @ weight).to(h.dtype) if probs.dtype != weight.dtype else probs @ weight


def conditioning(model: nn.Module, ids: torch.Tensor, target_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """What a denoiser reads besides z_t and t, as keyword arguments: the target mask and the token ids where its
    config needs them (`needs_target_mask`, `needs_ids`); nothing for a model without such a config."""
    config = getattr(model, "config", None)
    out = {}
    if getattr(config, "needs_target_mask", False):
        out["target_mask"] = target_mask
    if getattr(config, "needs_ids", False):
        out["ids"] = ids
    return out


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_model(config) -> nn.Module:
    """The denoiser a RunConfig names (`model.arch`): ours (also as an encoder–decoder), or DiffuSeq's network
    (diffuseq_model.py)."""
    if config.model.arch == "diffuseq":
        from .diffuseq_model import DiffuSeqDenoiser

        return DiffuSeqDenoiser(config.model, config.diffusion.T)
    return Denoiser(config.model)
