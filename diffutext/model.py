"""The denoiser f(z_t, t) -> x0_hat and its tied word embedding (method.md §1).

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
from .diffusion import alpha_bar_table


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

    def joint(self, x: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor | None = None, cache: dict | None = None) -> torch.Tensor:
        """A decoder block of arch encdec: the rows x (B, Lt, W) attend to the encoded source `memory` (B, Ls, W) and
        to themselves in one softmax, over this block's own key and value projections of both (as if memory and x
        were one sequence whose memory rows are then kept); mask (B, 1, 1, Ls + Lt): the keys each row may read.
        `cache` (an `Encoded`'s): the memory's keys and values, made on the first call and read on the others."""
        B, Lt, W = x.shape
        H, d = self.heads, W // self.heads
        q, k, v = self.qkv(self.norm1(x)).view(B, Lt, 3, H, d).permute(2, 0, 3, 1, 4)  # 3×(B, H, Lt, d)
        if cache is not None and id(self) in cache:
            km, vm = cache[id(self)]
        else:
            km, vm = F.linear(self.norm1(memory), self.qkv.weight[W:], self.qkv.bias[W:]).view(B, -1, 2, H, d).permute(2, 0, 3, 1, 4)
            if cache is not None:
                cache[id(self)] = (km, vm)
        p = self.dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, torch.cat([km, k], 2), torch.cat([vm, v], 2), attn_mask=mask, dropout_p=p)
        x = x + ops.dropout(self.proj(a.transpose(1, 2).reshape(B, Lt, W)), self.dropout, self.training)
        return x + ops.dropout(self.mlp(self.norm2(x)), self.dropout, self.training)

    def _forward_lean(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The same block with the ops of `ops`, which save less for backward."""
        B, L, W = h.shape
        p, training = self.dropout, self.training
        q, k, v = ops.norm_linear(h, self.norm1, self.qkv).view(B, L, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        a = ops.attention(q, k, v, p, training, mask)
        h = h + ops.dropout(self.proj(a.transpose(1, 2).reshape(B, L, W)), p, training)
        return h + ops.dropout(ops.gelu_linear(ops.norm_linear(h, self.norm2, self.mlp[0]), self.mlp[2]), p, training)


class Encoded:
    """The encoded source of a chain (arch encdec, `Denoiser.encode`) and its keys and values in every decoder block,
    made once and read at every step (`forward(memory=Encoded(...))`)."""

    def __init__(self, memory: torch.Tensor):
        self.memory = memory
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def shape(self) -> torch.Size:
        return self.memory.shape

    def __getitem__(self, rows) -> torch.Tensor:
        return self.memory[rows]


class Denoiser(nn.Module):
    def __init__(self, config: ModelConfig, alpha_bar: torch.Tensor | None = None, process: str = "gaussian"):
        """`alpha_bar` (T,): the schedule's ᾱ table, which the classifier's output prior reads (`diffusion.alpha_bar_table`);
        `process` mask (masked.py): a learned mask vector, and no output prior (nothing Gaussian to read)."""
        super().__init__()
        if config.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set (from the tokenizer) before building the model")
        c = self.config = config
        if (c.x0_from == "classifier" or c.input_posterior) and alpha_bar is None:
            raise ValueError("the classifier's output prior reads the schedule: build the model with its alpha_bar table")
        if alpha_bar is not None:  # derived from the config: not part of the weights
            self.register_buffer("alpha_bar", alpha_bar.float(), persistent=False)
        self.prior_scale = 1.0  # the output prior's ramp (train.py sets it during the warm-up); 1 when decoding
        self.process = process
        if process == "mask":  # the masked tokens' input (masked.py)
            self.mask_embedding = nn.Parameter(torch.randn(c.hidden_dim) * c.hidden_dim**-0.5)
        if c.copy_source == "auto":
            raise ValueError("ModelConfig.copy_source auto must be resolved (on or off, from the training split) before building the model")
        self.embedding = nn.Embedding(c.vocab_size, c.hidden_dim)  # E, initialised N(0, 1) like DiffuSeq's
        self.head_bias = nn.Parameter(torch.zeros(c.vocab_size))
        # with self-conditioning the up-projection reads [z_t, x0_hat_prev] (SeqDiffuSeq's concatenation)
        # and with the copied input also the aligned source embedding (Gu et al. 2018's decoder input)
        inputs = 1 + (c.self_condition > 0) + c.copy_input
        self.up = nn.Sequential(nn.Linear(c.hidden_dim * inputs, c.width), nn.Tanh(), nn.Linear(c.width, c.width))
        self.time_mlp = nn.Sequential(nn.Linear(c.time_dim, 4 * c.time_dim), nn.SiLU(), nn.Linear(4 * c.time_dim, c.width))
        self.position = nn.Embedding(c.seq_len, c.width)
        self.in_norm = nn.LayerNorm(c.width)
        self.blocks = nn.ModuleList(Block(c.width, c.heads, c.ffn, c.dropout) for _ in range(c.layers))
        self.out_norm = nn.LayerNorm(c.width)
        if c.x0_from == "classifier":  # CDCD's readout: (LayerNorm, then) a zero-initialised Linear to the vocabulary
            self.readout = nn.Linear(c.width, c.vocab_size)
            nn.init.zeros_(self.readout.weight)
            nn.init.zeros_(self.readout.bias)
        else:
            self.down = nn.Sequential(nn.Linear(c.width, c.width), nn.Tanh(), nn.Linear(c.width, c.hidden_dim))
        if c.copy_gate:  # how much each row copies its aligned copied token (starts near softplus(−4) ≈ 0.02)
            self.copy_gate = nn.Linear(c.width, 1)
            nn.init.zeros_(self.copy_gate.weight)
            nn.init.constant_(self.copy_gate.bias, -4.0)
        if c.copy_attention:  # the pointer's one attention head over the source's tokens, and its switch (π = 0.5 at first)
            self.pointer_query = nn.Linear(c.width, POINTER_DIM, bias=False)
            self.pointer_key = nn.Linear(c.width, POINTER_DIM, bias=False)
            self.pointer_switch = nn.Linear(c.width, 2)  # π, and the share β of the copy that takes s itself
            nn.init.zeros_(self.pointer_switch.weight)
            nn.init.zeros_(self.pointer_switch.bias)
        self.copy_diagonal = 0.0  # the copy attention's diagonal prior λ: 0 in training, a decode sets its own
        if c.input_posterior:  # a full-width input embedding, read through the token posterior of z_t
            self.input_embedding = nn.Embedding(c.vocab_size, c.width)
            nn.init.normal_(self.input_embedding.weight, std=c.width**-0.5)
        if c.target_length == "head":  # the target's length as an offset from the source's (Difformer, DINOISER)
            self.length_head = nn.Sequential(nn.LayerNorm(c.width), nn.Linear(c.width, 2 * length_range(c) + 1))
        if c.absorbing > 0:  # DiffuSeq-v2's learned absorbing state m, initialised N(0, 1/hidden_dim) as there
            self.mask_state = nn.Parameter(torch.randn(c.hidden_dim) * c.hidden_dim**-0.5)
        if c.positions == "segment":
            self.segment = nn.Embedding(2, c.width)  # source / target
        if c.needs_ids:  # the copy prior's lexicon, counted from the training split when training starts (identity here)
            self.register_buffer("lexicon", torch.arange(c.vocab_size))
        if c.copy_source == "on":  # the copy prior starts from the copy itself: the network's output is 0 until it learns
            nn.init.zeros_(self.down[2].weight)
            nn.init.zeros_(self.down[2].bias)
        if c.embedding_norm:  # rows start on the sphere of radius √hidden_dim
            with torch.no_grad():
                self.embedding.weight.copy_(self.table())

    def table(self) -> torch.Tensor:
        """The word embedding E as the diffusion space sees it (V, hidden_dim): with `embedding_norm` every row
        scaled to norm √hidden_dim (the parameter itself is free; the gradient flows through the scaling)."""
        w = self.embedding.weight
        if not self.config.embedding_norm:
            return w
        return w * (math.sqrt(w.shape[1]) / w.float().norm(dim=1, keepdim=True).clamp(min=1e-8)).to(w.dtype)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """E(w): (B, L) -> (B, L, hidden_dim)."""
        if not self.config.embedding_norm:
            return self.embedding(ids)
        return F.embedding(ids, self.table())

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Tied head: (..., hidden_dim) -> (..., vocab). For a classifier, whose own logits read the network, this is
        the rounding of a point of the diffusion space (its nearest embedding, on the sphere of `embedding_norm`)."""
        return x @ self.table().t() + self.head_bias

    def positional(self, L: int, target_mask: torch.Tensor | None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """What marks each position: (L, W) for "absolute" positions, or, for "segment" positions,
        (B, L, W): source positions 0, 1, … from [CLS], target positions 1, 2, … from the first target token
        (target token k where source token k is), plus the side's embedding. target_mask (B, L). `rows` (B, R): only
        those positions of each row, (B, R, W)."""
        if self.config.positions == "absolute":
            return self.position.weight[:L] if rows is None else self.position(rows)
        idx = torch.arange(L, device=target_mask.device) if rows is None else rows
        start = target_mask.int().argmax(1, keepdim=True)  # the first target position (after [CLS] src [SEP])
        target = target_mask if rows is None else target_mask.gather(1, rows)
        ids = torch.where(target, (idx - start + 1).clamp(max=L - 1), idx)
        return self.position(ids) + self.segment(target.long())

    def forward(
        self,
        z_t: torch.Tensor,
        t: torch.Tensor,
        x0_prev: torch.Tensor | None = None,
        target_mask: torch.Tensor | None = None,
        with_head: bool = False,
        ids: torch.Tensor | None = None,
        hold: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
    ):
        """x0_hat = f(z_t, t): (B, L, hidden_dim), (B,) -> (B, L, hidden_dim).

        A self-conditioned model (config.self_condition > 0) also reads x0_prev, the previous estimate of x0
        (zeros when there is none, the default); any other model ignores it. A model with segment positions
        needs target_mask (B, L); any other ignores it. with_head: (x0_hat, h), where h is what the tied head
        reads as this prediction's logits (the anchor loss's input): x0_hat itself for "regression"; for
        "classifier", h is the logits themselves at the written positions (`classify`). With the copy prior (config.copy_source) x0_hat is the
        network's output plus `copy_prior(z_t)`; with the copied input (config.copy_input) the network also reads it.
        A model with the lexicon (config.copy_lexicon) needs the token ids (B, L) too. A model with a length head
        (config.target_length head) needs `hold` (B, L): the target's [SEP] and its padding, held clean; the padding
        after that [SEP] is out of attention. arch encdec: `memory`, the encoded source from `encode`, skips the
        encoder (it is the same at every step of a chain)."""
        c = self.config
        if c.needs_target_mask and target_mask is None:
            raise ValueError(
                "a model with segment positions, the copy prior, the copied input, arch encdec or the classifier needs the target mask"
            )
        if c.needs_ids and ids is None:
            raise ValueError("a model with the copy prior's lexicon needs the token ids")
        if c.needs_hold and hold is None:
            raise ValueError("a model with a length head needs the held positions (the target's [SEP] and its padding)")
        copied = self.copy_prior(z_t, target_mask, ids, hold) if c.copy_source == "on" or c.copy_input else None
        if c.arch == "encdec" and memory is not None:  # the source is encoded: build the decoder's rows alone
            rows = self.sides(target_mask, hold, memory.shape[1])[2]
            h = self.encode_decode(self._inputs(z_t, t, x0_prev, target_mask, copied, hold, rows), target_mask, hold, memory)
        else:
            h = self._inputs(z_t, t, x0_prev, target_mask, copied, hold)
            h = self.encode_decode(h, target_mask, hold) if c.arch == "encdec" else self.run_blocks(h, self.keys(target_mask, hold))
        h = self.out_norm(h)
        if c.x0_from == "classifier":
            x0_hat, logits = self.classify(h, z_t, t, target_mask if hold is None else target_mask & ~hold, copied, ids)
            return (x0_hat, logits) if with_head else x0_hat
        x0_hat = h = self.down(h)
        if c.copy_source == "on":
            x0_hat = h = x0_hat + copied.to(x0_hat.dtype)
        return (x0_hat, h) if with_head else x0_hat

    def prior_coef(self, t: torch.Tensor, L: int, rows: torch.Tensor) -> torch.Tensor:
        """√ᾱ_t/(1 − ᾱ_t) of each flat row `rows` of a (B, L) batch, at its own timestep: (N,) float32."""
        ab = self.alpha_bar[t].float()
        return (ab.sqrt() / (1 - ab)).index_select(0, rows // L)

    def prior_logits(self, z: torch.Tensor, t: torch.Tensor, L: int, rows: torch.Tensor) -> torch.Tensor:
        """The output prior's logits (N, V) at flat rows `rows` of a (B, L) batch whose rows of z (N, D) are given:
        (√ᾱ_t/(1 − ᾱ_t))·z·Êᵀ, the log-likelihood of z under each token at the row's own noise level, in float32."""
        return (self.prior_coef(t, L, rows)[:, None] * z.float()) @ self.table().float().t()

    def posterior_input(self, z_t: torch.Tensor, t: torch.Tensor, rows_mask: torch.Tensor) -> torch.Tensor:
        """`input_posterior`: at the written rows `rows_mask` (B, L), the input embedding averaged under the token
        posterior given z_t alone, softmax(prior logits)·E_in (E_in: V × width), over the posterior's POSTERIOR_TOP
        likeliest tokens with the rest of its mass on the mean row of E_in (exact where the posterior is peaked, the
        mean where it is flat, at a cost that does not grow with the vocabulary); zeros elsewhere. (B, L, W)."""
        B, L, D = z_t.shape
        rows = rows_mask.reshape(-1).nonzero().squeeze(1)
        with torch.autocast(z_t.device.type, enabled=False):
            probs = torch.softmax(self.prior_logits(z_t.reshape(B * L, D).index_select(0, rows), t, L, rows), -1)
            top, idx = probs.topk(min(POSTERIOR_TOP, probs.shape[-1]), -1)  # (N, k)
            weight = self.input_embedding.weight.float()
            mixed = (top[..., None] * weight[idx]).sum(1) + (1 - top.sum(-1, keepdim=True)) * weight.mean(0)
        out = torch.zeros(B * L, mixed.shape[-1], dtype=mixed.dtype, device=z_t.device).index_copy(0, rows, mixed)
        return out.view(B, L, -1)

    def _inputs(
        self,
        z_t: torch.Tensor,
        t: torch.Tensor,
        x0_prev: torch.Tensor | None,
        target_mask: torch.Tensor | None,
        copied: torch.Tensor | None,
        hold: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """What the blocks read: the up-projected [z_t, x0_prev, copied source] plus positions and the timestep,
        normalised (B, L, W). For arch encdec the source rows read neither x0_prev nor the timestep, so they are the
        same at every step of a chain. `rows` (B, R): only those positions of each row, (B, R, W) (the decoder's,
        once the source is encoded)."""
        c = self.config
        pick = (lambda x: x) if rows is None else (lambda x: x.gather(1, rows[..., None].expand(*rows.shape, x.shape[-1])))
        target = target_mask if rows is None or target_mask is None else target_mask.gather(1, rows)
        inputs = [pick(z_t)]
        if c.self_condition > 0:
            prev = torch.zeros_like(inputs[0]) if x0_prev is None else pick(x0_prev.to(z_t.dtype))
            if c.arch == "encdec":
                prev = prev * target.unsqueeze(-1).to(prev.dtype)
            inputs.append(prev)
        if c.copy_input:
            inputs.append(pick(copied))
        h = self.up(torch.cat(inputs, -1) if len(inputs) > 1 else inputs[0])
        if c.input_posterior:
            h = h + pick(self.posterior_input(z_t, t, target_mask if hold is None else target_mask & ~hold))
        time = self.time_mlp(timestep_embedding(t, c.time_dim))[:, None]
        if c.arch == "encdec":  # the encoder reads no timestep: the source's encoding is the same at every step
            time = time * target.unsqueeze(-1).to(time.dtype)
        h = h + self.positional(z_t.shape[1], target_mask, rows) + time
        return ops.dropout(self.in_norm(h), self.config.dropout, self.training)  # (B, L or R, W)

    @staticmethod
    def keys(target_mask: torch.Tensor | None, hold: torch.Tensor | None) -> torch.Tensor | None:
        """The attention's key mask (B, 1, 1, L), True where a key is read: every position but the held padding after
        the target's [SEP] (the first held position); None when nothing is held."""
        if hold is None:
            return None
        first = hold & ~torch.roll(hold, 1, dims=1)  # the [SEP]: a held position after one that is not
        return (~hold | first)[:, None, None, :]

    def run_blocks(self, h: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        """The bidirectional encoder over the whole sequence (DiffuSeq's): (B, L, W) -> (B, L, W)."""
        for block in self.blocks:
            h = block(h, keys)
        return h

    @staticmethod
    def sides(
        target_mask: torch.Tensor, hold: torch.Tensor | None, Ls: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """arch encdec's two sequences in the packed batch: the positions of the source rows (B, Ls) and of the target
        rows (B, Lt) ([SEP] included, the padding after it left out when it is held), each with its validity (B, Ls),
        (B, Lt). Ls (unless given: an encoded source's own) and Lt are the longest of the batch (one read of two
        numbers per forward)."""
        B, L = target_mask.shape
        start = target_mask.int().argmax(1)  # (B,): the first target position
        if hold is None:
            end = torch.full_like(start, L)
        else:  # up to and with the [SEP], the first held position
            end = (target_mask & ~hold).sum(1) + start + 1
        Ls, Lt = (int(start.max()) if Ls is None else Ls), int((end - start).max())
        src = torch.arange(Ls, device=start.device).expand(B, Ls)
        trg = start[:, None] + torch.arange(Lt, device=start.device)
        return src.clamp(max=L - 1), src < start[:, None], trg.clamp(max=L - 1), trg < end[:, None]

    def encode_source(self, h: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
        """arch encdec's encoder: the first layers // 2 blocks over the source rows ([CLS] src [SEP]) alone:
        (B, L, W) -> (B, Ls, W), the encoded source in the layout of `sides`."""
        src, src_ok, _, _ = self.sides(target_mask, None)
        memory = h.gather(1, src[..., None].expand(*src.shape, h.shape[-1]))
        keys = src_ok[:, None, None, :]
        for block in self.blocks[: len(self.blocks) // 2]:
            memory = block(memory, keys)
        return memory

    def encode(self, z: torch.Tensor, target_mask: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """arch encdec: the encoded source (B, Ls, W) of a batch whose source rows of z hold the clean source, for
        `forward(memory=...)`: what every step of a chain would compute again."""
        copied = self.copy_prior(z, target_mask, ids) if self.config.copy_source == "on" or self.config.copy_input else None
        t = torch.zeros(z.shape[0], dtype=torch.long, device=z.device)
        return self.encode_source(self._inputs(z, t, None, target_mask, copied), target_mask)

    def encode_decode(
        self, h: torch.Tensor, target_mask: torch.Tensor, hold: torch.Tensor | None = None, memory: torch.Tensor | None = None
    ) -> torch.Tensor:
        """arch encdec: the first layers // 2 blocks encode the source rows ([CLS] src [SEP], reading only them),
        the others decode the target rows. A decoder block's queries read the encoded source and the target rows
        in one attention (cross- and self-attention in one softmax, over the block's own key and value
        projections, `Block.joint`). Each side runs as its own sequence (`sides`): no block computes a row it
        discards. `memory`: the encoder's output (`encode`), given: h is then the decoder's rows alone (B, Lt, W), in
        the layout of `sides`. (B, L, W), (B, L) -> (B, L, W): the source rows hold the encoded source, the target rows
        the decoder's output, held padding zeros."""
        B, L, W = h.shape[0], target_mask.shape[1], h.shape[-1]
        src, src_ok, trg, trg_ok = self.sides(target_mask, hold, None if memory is None else memory.shape[1])
        cache = None
        if isinstance(memory, Encoded):
            memory, cache = memory.memory, memory.kv
        if memory is None:
            memory = self.encode_source(h, target_mask)
            x = h.gather(1, trg[..., None].expand(*trg.shape, W))
        else:
            x = h
        if memory.dtype != x.dtype:  # autocast: the keys and values made from it are then made again each time
            memory, cache = memory.to(x.dtype), None
        keys = torch.cat([src_ok, trg_ok], 1)[:, None, None, :]
        for block in self.blocks[len(self.blocks) // 2 :]:
            x = block.joint(x, memory, keys, cache)
        base = torch.arange(B, device=h.device)[:, None] * L
        rows = torch.cat([(base + src)[src_ok], (base + trg)[trg_ok]])
        values = torch.cat([memory[src_ok], x[trg_ok]])
        return x.new_zeros(B * L, W).index_copy(0, rows, values.to(x.dtype)).view(B, L, W)

    def classify(
        self,
        h: torch.Tensor,
        z_t: torch.Tensor,
        t: torch.Tensor,
        rows_mask: torch.Tensor,
        copied: torch.Tensor | None = None,
        ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The classifier (CDCD): logits at the written positions `rows_mask` (B, L), in row-major order (N, V) =
        readout(h) + the output prior (√ᾱ_t/(1 − ᾱ_t))·z_t·Êᵀ, and x0_hat = softmax(logits)·Ê there (the
        expected embedding), z_t elsewhere. With `copy_gate`, also g·c·Êᵀ for the copied input c (B, L, D) and a
        gate g = softplus(w·h + b) of each row. With `copy_attention`, the readout's (and the gate's) distribution is
        first mixed with the pointer's copy distribution (`pointer`): the logits are log((1 − π)·softmax + π·copy) plus
        the output prior. The prior, the copy's terms and the softmax run in float32."""
        B, L, D = z_t.shape
        rows = rows_mask.reshape(-1).nonzero().squeeze(1)
        hr = h.reshape(B * L, -1).index_select(0, rows)
        logits = self.readout(hr)
        with torch.autocast(z_t.device.type, enabled=False):
            logits = logits.float()
            table = self.table().float()
            zr = z_t.reshape(B * L, D).index_select(0, rows).float()
            terms = []  # (N, D) points whose products with Êᵀ add to the logits: one product for all of them
            if self.config.copy_gate:  # pointer-generator's copy (See et al. 2017), of the aligned copied token
                gate = F.softplus(self.copy_gate(hr).float())  # (N, 1)
                terms.append(gate * copied.reshape(B * L, D).index_select(0, rows).float())
            if self.config.copy_attention:  # the gate's term belongs to the readout's distribution: added before
                if terms:  # in place (logits is float32 here): the readout's backward does not read its output
                    logits = logits.addmm_(terms.pop(), table.t())
                logits = mix_copies(logits, *self.pointer(h, hr, rows, ids, rows_mask))
            if self.config.output_prior and self.process == "gaussian":
                terms.append(self.prior_scale * self.prior_coef(t, L, rows)[:, None] * zr)
            if terms:  # in place: no second copy of the (N, V) logits
                logits = logits.addmm_(sum(terms), table.t())
            x0 = torch.softmax(logits, -1) @ table
            x0_hat = z_t.float().reshape(B * L, D).index_copy(0, rows, x0).view(B, L, D)
        return x0_hat, logits

    def pointer(
        self, h: torch.Tensor, hr: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor, rows_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The pointer-generator's copy by attention (See et al. 2017): for the written rows `rows` (N,) of the
        blocks' output h (B, L, W) (hr: those rows, (N, W)), one attention head over the source's tokens s in `ids`
        (B, L) (the positions between [CLS] and the [SEP] before the first written row of `rows_mask` (B, L)), its
        weights shared between the tokens they copy: β of each onto s itself, 1 − β onto its lexicon copy lex(s)
        (the same token without the lexicon), with β = sigmoid(w′·h + b′) per row; and the switch π = sigmoid(w·h + b).
        With the diagonal prior λ (`copy_diagonal`), −λ·|j − k| is added to the score of source token j at target token k.
        For `mix_copies`, float32: π's logit (N, 1), the copied tokens (N, 2L) and their weights (N, 2L), 0 outside
        the source."""
        B, L, _ = h.shape
        batch = rows // L
        idx = torch.arange(L, device=h.device)
        start = rows_mask.int().argmax(1, keepdim=True)  # the first target position (after [CLS] src [SEP])
        source = (idx >= 1) & (idx < start - 1)  # (B, L)
        keys, query = self.pointer_key(h).float(), self.pointer_query(h).float()  # (B, L, P) each
        scores = torch.bmm(query, keys.transpose(1, 2)) * POINTER_DIM**-0.5  # (B, L, L)
        if self.copy_diagonal > 0:  # row i writes target token i − start + 1; column j holds source token j
            offset = idx.view(1, 1, L) - idx.view(1, L, 1) + (start - 1).view(B, 1, 1)
            scores = scores - self.copy_diagonal * offset.abs()
        scores = scores.masked_fill(~source[:, None], -1e4)
        weights = torch.softmax(scores.view(B * L, L).index_select(0, rows), -1)  # (N, L): the written rows' alone
        switch, share = self.pointer_switch(hr).float().split(1, -1)  # (N, 1) each: logits of π and β
        share = torch.sigmoid(share)
        source_ids = ids.index_select(0, batch)  # (N, L)
        tokens = torch.cat([source_ids, self.lexicon[source_ids]], 1)
        return switch, tokens, torch.cat([weights * share, weights * (1 - share)], 1)

    def length_logits(self, memory: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
        """The length head: logits (B, 2K + 1) over the target's length minus the source's, −K..K
        (K = `length_range`), from the encoded source averaged over its rows."""
        _, src_ok, _, _ = self.sides(target_mask, None, memory.shape[1])
        source = src_ok.unsqueeze(-1).to(memory.dtype)  # memory is (B, Ls, W), in the layout of `sides`
        pooled = (memory * source).sum(1) / source.sum(1).clamp(min=1)
        return self.length_head(pooled).float()

    def copy_prior(
        self, z_t: torch.Tensor, target_mask: torch.Tensor, ids: torch.Tensor | None, hold: torch.Tensor | None = None
    ) -> torch.Tensor:
        """What the copy prior adds (and the copied input reads): `copied_source(z_t)`, or with the lexicon the source
        embedding of lex(s) for each source token s (E(lex(s)) at the aligned target position); source positions keep z_t.
        With `copy_align` uniform, the target's length is where `hold` begins."""
        lengths = None
        if self.config.copy_align == "uniform" and hold is not None:
            lengths = (target_mask & ~hold).sum(1)
        if not self.config.needs_ids:
            return self.copied_source(z_t, target_mask, lengths)
        source = self.embed(self.lexicon[ids]).to(z_t.dtype)  # only its source positions are read
        return torch.where(target_mask.unsqueeze(-1), self.copied_source(source, target_mask, lengths), z_t)

    @staticmethod
    def copied_source(z_t: torch.Tensor, target_mask: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """The copy prior's starting point: at target position start + k − 1 (target token k) the input at source
        token k's position k, or at the source's [SEP] (position start − 1) once the source has ended; at source
        positions their own input (the unnoised source). With the target's `lengths` (B,), Gu et al. 2018's uniform
        copy instead: target token k of n copies source token 1 + ⌊(k − 1)·m/n⌋ of m (the [SEP] copies the source's).
        (B, L, D), (B, L) -> (B, L, D)."""
        B, L, D = z_t.shape
        idx = torch.arange(L, device=z_t.device).expand(B, L)
        start = target_mask.int().argmax(1, keepdim=True)  # the first target position (after [CLS] src [SEP])
        if lengths is None:
            along = idx - start + 1
        else:  # target token k (1-based) at position start + k − 1; the source's m = start − 2 tokens at 1..m
            n = lengths.view(-1, 1).clamp(min=1)
            along = 1 + torch.div((idx - start) * (start - 2), n, rounding_mode="floor")
            along = torch.where(idx - start < n, along, start - 1)
        aligned = torch.where(target_mask, torch.minimum(along, start - 1), idx)
        return z_t.gather(1, aligned[..., None].expand(B, L, D))


def mix_copies(logits: torch.Tensor, switch: torch.Tensor, tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """log((1 − π)·softmax(logits) + π·c): (N, V), with π = sigmoid(switch) (N, 1) and the copy distribution c putting
    `weights` (N, K) on `tokens` (N, K) (a token's weights add up). In log space, as a dense log-softmax and a
    correction at the K copied tokens alone: log(1 − π) and log π never reach −∞, and nothing but the log-softmax
    touches the (N, V) logits (in place when no gradient is recorded: `logits` is then consumed)."""
    copied = weights > 0
    key, order = torch.where(copied, tokens, -1).sort(-1)  # each row's entries grouped by token
    first_sorted = torch.ones_like(copied)
    first_sorted[:, 1:] = key[:, 1:] != key[:, :-1]
    group = first_sorted.cumsum(1) - 1  # (N, K): the sorted entries' token, numbered within the row
    totals = torch.zeros_like(weights).scatter_add(1, group, weights.gather(1, order))
    mass = torch.empty_like(weights).scatter(1, order, totals.gather(1, group))  # each entry's token's whole weight
    first = torch.empty_like(copied).scatter(1, order, first_sorted) & copied  # a token's first entry corrects it
    shift = logits.logsumexp(-1, keepdim=True) - F.logsigmoid(-switch)
    inplace = not torch.is_grad_enabled()
    out = logits.sub_(shift) if inplace else logits - shift
    at = out.gather(1, tokens)
    correction = (torch.logaddexp(at, F.logsigmoid(switch) + mass.clamp(min=1e-30).log()) - at) * first
    return out.scatter_add_(1, tokens, correction) if inplace else out.scatter_add(1, tokens, correction)


def conditioning(
    model: nn.Module, ids: torch.Tensor, target_mask: torch.Tensor, hold: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """What a denoiser reads besides z_t and t, as keyword arguments: the target mask, the token ids and the held
    positions where its config needs them (`needs_target_mask`, `needs_ids`, `needs_hold`); nothing for a model
    without such a config."""
    config = getattr(model, "config", None)
    out = {}
    if getattr(config, "needs_target_mask", False):
        out["target_mask"] = target_mask
    if getattr(config, "needs_ids", False):
        out["ids"] = ids
    if getattr(config, "needs_hold", False):
        if hold is None:
            raise ValueError("a model with a length head needs the held positions (the target's [SEP] and its padding)")
        out["hold"] = hold
    return out


POINTER_DIM = 64  # the copy attention's query and key width
POSTERIOR_TOP = 16  # the posterior input's tokens read one by one (the rest of the mass reads the mean embedding)


def length_range(config: ModelConfig) -> int:
    """K: the length head tells target lengths from K shorter to K longer than the source."""
    return max(config.seq_len // 2, 1)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_model(config) -> nn.Module:
    """The denoiser a RunConfig names (`model.arch`): ours (also as an encoder–decoder), or DiffuSeq's network
    (diffuseq_model.py)."""
    if config.model.arch == "diffuseq":
        from .diffuseq_model import DiffuSeqDenoiser

        return DiffuSeqDenoiser(config.model, config.diffusion.T)
    return Denoiser(config.model, alpha_bar_table(config.diffusion.schedule, config.diffusion.T), config.diffusion.process)
