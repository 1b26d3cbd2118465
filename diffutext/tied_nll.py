"""The tied head's cross-entropy in row chunks: DiffuSeq's rounding term (decoder_nll, method.md §1) without
ever holding the (tokens × vocabulary) logits.

`tied_nll(x, E, b, y)` = mean_n [logsumexp_v(x_n·E_v + b_v) − (x_n·E_{y_n} + b_{y_n})], forward and
backward one chunk of rows at a time (`_chunk_rows` sizes a chunk to the cache), exponentials in place.
"""

from __future__ import annotations

import torch

from .device import compute_dtype


def _exp_(x: torch.Tensor) -> torch.Tensor:
    """exp in place of arguments ≤ 0, with those below −60 raised to −60 first. Against a sum ≥ 1,
    exp(−60) ≈ 9e−27 per entry changes nothing even in float64, and it keeps x86 CPUs off two slow
    paths: exp's own underflow path (most shifted logits of the tied head lie far below −80), and
    the subnormal products that exp(−80) times a small weight would feed the gradient products."""
    return x.clamp_(min=-60.0).exp_()


def _chunk_rows(vocab: int, itemsize: int = 4) -> int:
    """Rows per chunk: a (vocab × rows) block of up to 16 MB, half the L3 cache of the 2-core CPU it was
    tuned on, in a multiple of 64 rows (an odd count halves the products' speed there): 128 rows of
    float32 or 256 of bf16 at vocabulary 30,522."""
    rows = (1 << 24) // (max(vocab, 1) * itemsize)
    return max(64, min(4096, rows - rows % 64))


class _TiedNLL(torch.autograd.Function):
    """nll_n = logsumexp_v(x_n·E_v + b_v) − (x_n·E_{y_n} + b_{y_n}), one row chunk at a time.

    Memory is O(rows × D + V × D), never the (rows × V) logits and their softmax. Each chunk is one
    matrix product of the augmented operands [E, b, 1] · [x, 1, −σ]ᵀ, which gives the logits already
    shifted by a per-row σ: no pass over the chunk for the max or the subtraction. σ is the target's
    own logit (the largest, or close to it, once the rounding term has done its work), so that
    e = exp(logit − σ) sums to total ≥ 1 and nll = log(total); a chunk whose sum overflows is redone
    with its column maxima. The softmax normalisation is folded into the operands of the gradient
    products instead of a division pass. The products run in the autocast dtype when autocast is on
    (as `x @ E.t()` would); sums are float32.

    Gradients: on CPU, when a gradient will be needed, forward also computes the gradient for a
    unit upstream gradient from the chunk it already holds (three products in all, as plain
    autograd does); backward scales it when the upstream gradient is the same for every row, as a
    mean-reduced loss gives (checked, no device there to sync with). Otherwise (a weighted loss,
    or CUDA, where the check would sync) backward recomputes each chunk shifted by the log-sum-exp
    itself: exact either way.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, target, dtype):
        need = ctx.needs_input_grad[:3]
        ahead = any(need) and x.device.type == "cpu"
        with torch.autocast(x.device.type, enabled=False):
            xc, wc, bc = x.to(dtype), weight.to(dtype), bias.to(dtype)
            picked = (wc[target].float() * xc.float()).sum(-1) + bc[target].float()  # the target logits
            shift = picked.to(dtype)  # σ, exactly as the product will use it
            wa, xa = _augmented(xc, wc, bc, shift)
            D = xc.shape[1]
            lse = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
            grads = _zero_grads(xc, wa) if ahead else None
            step = _chunk_rows(weight.shape[0], wc.element_size())
            buffer = _Buffer()
            for i in range(0, x.shape[0], step):  # a handful of chunks, each one big matrix product
                rows = slice(i, i + step)
                s = buffer.mm(wa, xa[rows].t())  # (V, c): logits − σ, the fast layout for D ≪ V
                if not ahead:
                    lse[rows] = torch.logsumexp(s.float(), 0) + shift[rows].float()
                    continue
                e = _exp_(s)
                ge = _chunk_gx(e, wa)  # column D+1: Σ_v e
                total = ge[:, D + 1].float()
                if not bool(torch.isfinite(total).all()):  # some logit far above the target's: shift by the max
                    xa[rows, D + 1] -= (wa @ xa[rows].t()).amax(0)
                    e = _exp_(buffer.mm(wa, xa[rows].t()))
                    ge = _chunk_gx(e, wa)
                    total = ge[:, D + 1].float()
                lse[rows] = -xa[rows, D + 1].float() + total.log()
                _add_chunk_grads(e, ge, 1.0 / total, rows, xa, grads)
            if ahead:
                _sub_one_hot(torch.ones_like(lse), target, xc, wc, grads)
        ctx.save_for_backward(xc, wc, bc, target, lse)
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype)
        ctx.unit_grads = grads
        return lse - picked

    @staticmethod
    def backward(ctx, grad):
        xc, wc, bc, target, lse = ctx.saved_tensors
        need = ctx.needs_input_grad[:3]
        grad = grad.float()
        grads, ctx.unit_grads = ctx.unit_grads, None
        if grads is not None and bool((grad == grad[0]).all()):
            grads = tuple(g.mul_(grad[0]) for g in grads)
        else:
            with torch.autocast(xc.device.type, enabled=False):
                shift = lse.to(xc.dtype)  # σ = the log-sum-exp, rounded: every shifted logit ≤ about 0
                wa, xa = _augmented(xc, wc, bc, shift)
                D = xc.shape[1]
                grads = _zero_grads(xc, wa)
                step = _chunk_rows(wc.shape[0], wc.element_size())
                buffer = _Buffer()
                for i in range(0, xc.shape[0], step):
                    rows = slice(i, i + step)
                    e = _exp_(buffer.mm(wa, xa[rows].t()))
                    ge = _chunk_gx(e, wa)  # column D+1: Σ_v e of these very exponentials
                    # softmax = e / Σe, normalised by its own sum (in bf16 that sum is off 1 by the rounding of σ and of e)
                    _add_chunk_grads(e, ge, grad[rows] / ge[:, D + 1].float(), rows, xa, grads)
                _sub_one_hot(grad, target, xc, wc, grads)
        gx, gwa = grads
        D = xc.shape[1]
        out = (gx, gwa[:, :D], gwa[:, D])
        return tuple(g.to(dt) if n else None for g, dt, n in zip(out, ctx.dtypes, need)) + (None, None)


class _Buffer:
    """One allocation reused by every chunk's product: a fresh 30 MB tensor per chunk costs more in page
    faults than the exp over it."""

    def __init__(self):
        self.data: torch.Tensor | None = None

    def mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        n = a.shape[0] * b.shape[1]
        if self.data is None or self.data.numel() < n or self.data.dtype != a.dtype:
            self.data = torch.empty(n, dtype=a.dtype, device=a.device)
        return torch.mm(a, b, out=self.data[:n].view(a.shape[0], b.shape[1]))


def _augmented(xc, wc, bc, shift) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, b, 1] (V, D+2) and [x, 1, −σ] (N, D+2), whose product is the logits minus σ per row; both
    zero-padded to a multiple of 8 columns (an odd width slows the products by half)."""
    pad = -(wc.shape[1] + 2) % 8
    wa = torch.cat([wc, bc[:, None], torch.ones_like(bc)[:, None], wc.new_zeros(wc.shape[0], pad)], 1)
    xa = torch.cat([xc, torch.ones_like(shift)[:, None], -shift[:, None], xc.new_zeros(xc.shape[0], pad)], 1)
    return wa, xa


def _zero_grads(xc, wa) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 accumulators: d/dx (N, D) and d/d[E, b, ·] (V, D+2), whose column D is d/db."""
    return tuple(torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in (xc, wa))


def _chunk_gx(e: torch.Tensor, wa: torch.Tensor) -> torch.Tensor:
    """eᵀ·[E, b, 1, 0…]: sums over the vocabulary, the gradient's x part and, in column D+1, Σ_v e
    (in the product's dtype: under bf16 autocast its log is within about 0.004 of float32's)."""
    return e.t() @ wa


def _add_chunk_grads(e: torch.Tensor, ge: torch.Tensor, coef: torch.Tensor, rows: slice, xa, grads) -> None:
    """Add one chunk's softmax part. e (V, c) holds exp(logit − σ) and ge its `_chunk_gx`; the softmax
    times the upstream gradient is e · coef per column, applied to the small operands rather than to e."""
    gx, gwa = grads
    D = gx.shape[1]
    gx[rows] = ge[:, :D].float().mul_(coef[:, None])
    xs = (xa[rows].float() * coef[:, None]).to(e.dtype)  # rows scaled by coef; its column D gives d/db
    if e.dtype == torch.float32:
        gwa.addmm_(e, xs)
    else:
        gwa += e @ xs


def _sub_one_hot(grad: torch.Tensor, target, xc, wc, grads) -> None:
    """Subtract the one-hot part of the cross-entropy gradient, weighted by the upstream gradient."""
    gx, gwa = grads
    D = xc.shape[1]
    gx -= grad[:, None] * wc[target].float()
    gwa[:, :D].index_add_(0, target, -grad[:, None] * xc.float())
    gwa[:, D].index_add_(0, target, -grad)


def tied_nll(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy of the tied head, logits = x·Eᵀ + b, against target: (N, D) -> (N,) float32.

    The same numbers as `F.cross_entropy(x @ weight.t() + bias, target, reduction="none")`, without
    ever holding the (N × V) logits.
    """
    if bias is None:
        bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    return _TiedNLL.apply(x, weight, bias, target, compute_dtype(x))


# ---- the classifier's objective (CDCD) ----
