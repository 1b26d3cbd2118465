"""Lean training ops for the denoiser's blocks: PyTorch's own maths, saving less for backward.

Eager PyTorch keeps about 530 MB of activations per encoder block for backward at DiffuSeq's size
(base preset, batch 64 × 128 tokens); much of it is elementwise work that costs little to redo.
Each op here saves what its matrix products need and recomputes the rest in backward:

  norm_linear(x, norm, linear)  Linear(LayerNorm(x)); saves x and the row statistics, not LayerNorm(x)
  gelu_linear(a, linear)        Linear(GELU(a)); saves a, recomputes GELU(a)
  attention(q, k, v, p)         softmax(q·kᵀ/√d) with dropout p, times v; saves q, k, v and a seed,
                                recomputes the probabilities (one more q·kᵀ product) and the mask
  dropout(x, p)                 drops with probability p rounded to a multiple of 2⁻¹⁶, its mask
                                drawn as 16-bit random lanes, about 5× faster than bernoulli_ on
                                CPU; saves only the seed of its mask

Under autocast each op runs its products, GELU and softmax in the autocast dtype (softmax sums in
float32 inside) and its LayerNorm in float32, as autocast does. The model uses these ops only while
autograd records (training), and not under torch.compile, which fuses and plans memory itself.
Masks are drawn on CPU; on CUDA the model calls PyTorch's fused dropout and
scaled_dot_product_attention, which already save little.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .device import compute_dtype


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _linear_backward(g: torch.Tensor, inp: torch.Tensor, weight: torch.Tensor, need_bias: bool):
    """Gradients of y = inp·Wᵀ + b for upstream g: (g·W, gᵀ·inp, Σg)."""
    gi = g @ weight
    gw = _rows(g).t() @ _rows(inp)
    gb = _rows(g).sum(0) if need_bias else None
    return gi, gw, gb


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def _wide(dtype: torch.dtype) -> torch.dtype:
    """Where norms and softmax run: float32 for the half types, else the dtype itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# ---- dropout ----


def drop_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device, seed: int | None = None) -> torch.Tensor:
    """Bool mask, True (drop) with probability p rounded to a multiple of 2⁻¹⁶: one 64-bit draw gives four
    independent 16-bit lanes. Drawn from a generator seeded with `seed`, or without one from the default."""
    n = math.prod(shape)
    generator = None if seed is None else torch.Generator(device).manual_seed(seed)
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=device)
    bits.random_(-(2**63), 2**63 - 1, generator=generator)
    threshold = -(2**15) + round(p * 2**16)
    return bits.view(torch.int16)[:n].lt(threshold).view(shape)


def _new_seed() -> int:
    """One draw from the default generator: masks follow torch.manual_seed and a resumed RNG state."""
    return int(torch.empty((), dtype=torch.int64).random_())


class _Dropout(torch.autograd.Function):
    """Saves only the mask's seed: backward draws the same mask again (about 1 ms per 2M entries)."""

    @staticmethod
    def forward(ctx, x, p):
        ctx.seed, ctx.p = _new_seed(), p
        drop = drop_mask(x.shape, p, x.device, ctx.seed)
        return x.masked_fill(drop, 0).mul_(1.0 / (1.0 - p))

    @staticmethod
    def backward(ctx, g):
        drop = drop_mask(g.shape, ctx.p, g.device, ctx.seed)
        return g.masked_fill(drop, 0).mul_(1.0 / (1.0 - ctx.p)), None


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout's semantics (zero with probability p, scale the rest by 1/(1 − p)); on CPU with the
    fast mask of `drop_mask`, elsewhere PyTorch's fused kernel."""
    if not training or p <= 0.0:
        return x
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return F.dropout(x, p, True)
    return _Dropout.apply(x, p)


# ---- Linear(LayerNorm(x)) ----


class _NormLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, eps, weight, bias):
        dt = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            xf = x.to(_wide(x.dtype))
            xn, mean, rstd = torch.native_layer_norm(xf, (x.shape[-1],), _cast(norm_weight, xf.dtype), _cast(norm_bias, xf.dtype), eps)
            w = weight.to(dt)
            y = F.linear(xn.to(dt), w, _cast(bias, dt))
        ctx.save_for_backward(xf, mean, rstd, norm_weight, norm_bias, w)
        ctx.eps, ctx.dt = eps, dt
        ctx.dtypes = (x.dtype, weight.dtype)
        return y

    @staticmethod
    def backward(ctx, g):
        xf, mean, rstd, norm_weight, norm_bias, w = ctx.saved_tensors
        need = ctx.needs_input_grad
        with torch.autocast(xf.device.type, enabled=False):
            nw, nb = _cast(norm_weight, xf.dtype), _cast(norm_bias, xf.dtype)
            xn = torch.native_layer_norm(xf, (xf.shape[-1],), nw, nb, ctx.eps)[0]
            g = g.to(ctx.dt)
            gxn, gw, gb = _linear_backward(g, xn.to(ctx.dt), w, need[5])
            gx, gnw, gnb = torch.ops.aten.native_layer_norm_backward(
                gxn.to(xf.dtype), xf, (xf.shape[-1],), mean, rstd, nw, nb, [need[0], need[1] and nw is not None, need[2] and nb is not None]
            )
        return (_cast(gx, ctx.dtypes[0]), gnw, gnb, None, _cast(gw, ctx.dtypes[1]) if need[4] else None, _cast(gb, ctx.dtypes[1]))


def norm_linear(x: torch.Tensor, norm: nn.LayerNorm, linear: nn.Linear) -> torch.Tensor:
    """linear(norm(x)), saving x and the row statistics instead of norm(x)."""
    return _NormLinear.apply(x, norm.weight, norm.bias, norm.eps, linear.weight, linear.bias)


# ---- Linear(GELU(a)) ----


class _GeluLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, weight, bias):
        dt = compute_dtype(a)
        with torch.autocast(a.device.type, enabled=False):
            a_ = a.to(dt)
            w = weight.to(dt)
            y = F.linear(F.gelu(a_), w, _cast(bias, dt))
        ctx.save_for_backward(a_, w)
        ctx.dtypes = (a.dtype, weight.dtype)
        return y

    @staticmethod
    def backward(ctx, g):
        a_, w = ctx.saved_tensors
        need = ctx.needs_input_grad
        with torch.autocast(a_.device.type, enabled=False):
            g = g.to(a_.dtype)
            gh, gw, gb = _linear_backward(g, F.gelu(a_), w, need[2])
            ga = torch.ops.aten.gelu_backward(gh, a_)
        return _cast(ga, ctx.dtypes[0]), _cast(gw, ctx.dtypes[1]) if need[1] else None, _cast(gb, ctx.dtypes[1])


def gelu_linear(a: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """linear(GELU(a)) (exact GELU), saving a instead of GELU(a)."""
    return _GeluLinear.apply(a, linear.weight, linear.bias)


# ---- attention with dropout ----


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, p):
        dt = compute_dtype(q)
        with torch.autocast(q.device.type, enabled=False):
            q, k, v = q.to(dt), k.to(dt), v.to(dt)
            scale = 1.0 / math.sqrt(q.shape[-1])
            probs = torch.softmax(torch.matmul(q, k.transpose(-2, -1)).mul_(scale), -1)  # float32 sums inside
            ctx.seed = _new_seed()
            drop = drop_mask(probs.shape, p, q.device, ctx.seed)
            out = torch.matmul(probs.masked_fill_(drop, 0).mul_(1.0 / (1.0 - p)), v)
        ctx.save_for_backward(q, k, v)
        ctx.p, ctx.scale = p, scale
        return out

    @staticmethod
    def backward(ctx, g):
        q, k, v = ctx.saved_tensors
        p, scale = ctx.p, ctx.scale
        with torch.autocast(q.device.type, enabled=False):
            g = g.to(q.dtype)
            probs = torch.softmax(torch.matmul(q, k.transpose(-2, -1)).mul_(scale), -1)
            drop = drop_mask(probs.shape, p, q.device, ctx.seed)
            gv = torch.matmul(probs.masked_fill(drop, 0).mul_(1.0 / (1.0 - p)).transpose(-2, -1), g)
            gp = torch.matmul(g, v.transpose(-2, -1)).masked_fill_(drop, 0).mul_(1.0 / (1.0 - p))
            gs = torch.ops.aten._softmax_backward_data(gp, probs, -1, probs.dtype).mul_(scale)
            gq = torch.matmul(gs, k)
            gk = torch.matmul(gs.transpose(-2, -1), q)
        return gq, gk, gv, None


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float, training: bool, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Multi-head attention: q, k, v (B, H, L, d) -> (B, H, L, d); mask (B, 1, 1, L), True where a key is read.

    On CPU with dropout while training and no mask, `_Attention` (PyTorch's own kernel falls back to a path
    that keeps the (B, H, L, L) probabilities twice); otherwise scaled_dot_product_attention."""
    if mask is None and training and p > 0.0 and q.device.type == "cpu" and torch.is_grad_enabled():
        return _Attention.apply(q, k, v, p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p if training else 0.0)
