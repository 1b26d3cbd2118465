"""Training losses: DiffuSeq's terms (method.md §1) and the Distance Penalty (method.md §3).

Per example, with E(w) the word embeddings of the packed sequence:
  z0 = E(w) + σ0·ε,   z_t = q_sample(z0, t)            (source positions stay at z0)
  mse(t)       = mean over positions × dims of (E(w) − f(z_t, t))²
  decoder_nll  = cross-entropy of the tied head on z0 against w (the rounding term)
  tT           = mean (sqrt(ᾱ_{T−1})·z0)²               (prior term)
  base loss    = mse + decoder_nll + tT

Distance Penalty, with partner timestep t′ drawn from the noise-level window of t:
  loss = ½·[mse(t) + mse(t′) + 2·decoder_nll + 2·tT + λ·1[t′≠t]·mean‖f(z_t′,t′) − f(z_t,t)‖²]
With λ = 0 the partner pass is skipped and the loss is the base loss exactly.

Hot path: decoder_nll is `tied_nll.tied_nll`, a cross-entropy over the full vocabulary computed in
row chunks that never hold the (tokens × vocabulary) logits, and every random draw of a step can be
made up front (`draw_noise`) so that data-parallel ranks slice one global batch's noise.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from .diffusion import q_sample, sigma
from .masked import corrupt
from .model import conditioning
from .tied_nll import tied_nll


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch: (B, ...) -> (B,)."""
    return x.float().mean(dim=tuple(range(1, x.dim())))


def dp_window(alpha_bar: torch.Tensor, delta: float, ends: str = "diffutext") -> tuple[torch.Tensor, torch.Tensor]:
    """U(t) = largest s ≥ t with σ_s − σ_t ≤ δ; D(t) = smallest s ≤ t with σ_t − σ_s ≤ δ. Both (T,) long.

    σ_t is non-decreasing in t, so both are binary searches over the σ table. `ends` "reference": the reference
    code's partner map (two pointers over the σ table) has no upward entry for t whose window reaches T−1 and no
    downward entry for t whose window reaches 0, so those sides are empty (U(t) = t, D(t) = t) and the penalty is
    masked there; "diffutext" draws from [t+1, T−1] and [0, t−1] there.
    """
    s = sigma(alpha_bar.double())
    t = torch.arange(len(s))
    upper = torch.maximum(torch.searchsorted(s, s + delta, right=True) - 1, t)  # last index with σ ≤ σ_t + δ
    lower = torch.minimum(torch.searchsorted(s, s - delta, right=False), t)  # first index with σ ≥ σ_t − δ
    if ends == "reference":
        upper = torch.where(upper == len(s) - 1, t, upper)
        lower = torch.where(lower == 0, t, lower)
    elif ends != "diffutext":
        raise ValueError(f"unknown window ends {ends!r}; expected diffutext or reference")
    return upper, lower


def partner_timesteps(
    t: torch.Tensor,
    upper: torch.Tensor,
    lower: torch.Tensor,
    generator: torch.Generator | None = None,
    uniforms: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw t′ per example: with probability ½ uniformly from [t+1, U(t)], else from [D(t), t−1].

    `uniforms` (two (B,) draws in [0, 1): the side, the offset) replaces the draws from `generator`.
    Returns (t′, valid); where the chosen range is empty, t′ = t and valid is False.
    """
    u, d = upper[t], lower[t]
    if uniforms is None:
        uniforms = (torch.rand(t.shape, generator=generator, device=t.device), torch.rand(t.shape, generator=generator, device=t.device))
    up = uniforms[0] < 0.5
    r = uniforms[1]
    size = torch.where(up, u - t, t - d)  # number of candidates on the chosen side
    start = torch.where(up, t + 1, d)
    offset = (r * size).floor().long().clamp(max=(size - 1).clamp(min=0))
    valid = size > 0
    return torch.where(valid, start + offset, t), valid


@dataclass(frozen=True)
class LossOptions:
    """The loss options beyond DiffuSeq (method.md §7); the defaults are DiffuSeq's loss exactly.

    positions: "all" averages mse, decoder_nll and tT over every position (DiffuSeq), "target" over the
    target positions only (the source is never noised). anchor_weight > 0 adds Difformer's anchor loss,
    the tied head's cross-entropy on x0_hat at target positions, with label smoothing anchor_smoothing.
    noise_factor F scales the forward-process noise in training (Difformer; decoding keeps 1).
    """

    positions: str = "all"
    anchor_weight: float = 0.0
    anchor_smoothing: float = 0.0
    noise_factor: float = 1.0
    length_weight: float = 0.1  # the length head's cross-entropy (a model with target_length head)

    @classmethod
    def from_config(cls, config) -> LossOptions:
        t = config.train
        return cls(t.loss_positions, t.anchor_weight, t.anchor_smoothing, config.diffusion.noise_factor, t.length_weight)


@dataclass
class Noise:
    """Every random draw of one `diffusion_loss` call, made up front (`draw_noise`).

    Data-parallel ranks draw the noise of the whole global batch from one shared generator and
    each takes its rows (`noise[rows]`), so N processes see exactly the t and noise of one.
    """

    eps0: torch.Tensor  # (B, L, D) the jitter of z0 = E(w) + σ0·eps0
    eps: torch.Tensor  # (B, L, D) forward-process noise of z_t
    side: torch.Tensor | None = None  # (B,) uniform: which side of t the partner lies on
    offset: torch.Tensor | None = None  # (B,) uniform: where in that side
    eps2: torch.Tensor | None = None  # (B, L, D) the partner's own noise (forward or reverse)
    self_cond: torch.Tensor | None = None  # (B,) uniform: an example self-conditions when below the probability
    absorb: torch.Tensor | None = None  # (B, L) uniform: a target token is absorbed when below r·σ_t
    absorb2: torch.Tensor | None = None  # (B, L) the same for the partner

    def __getitem__(self, rows) -> Noise:
        return Noise(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[rows] for f in fields(self)})

    def to(self, device: torch.device) -> Noise:
        return Noise(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device) for f in fields(self)})


def draw_noise(
    shape: tuple[int, int, int],
    partner: bool,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    self_condition: bool = False,
    absorbing: bool = False,
) -> Noise:
    """The draws of one loss evaluation for a batch of `shape` (B, L, D), in the order
    `diffusion_loss` would make them itself; `partner` adds the Distance Penalty's draws,
    `self_condition` and `absorbing` those of the options (drawn after all the others, so that
    with the options off the draws are exactly the base loss's)."""
    B, L = shape[0], shape[1]
    eps0 = torch.randn(shape, generator=generator, device=device)
    eps = torch.randn(shape, generator=generator, device=device)
    noise = Noise(eps0, eps)
    if partner:
        noise.side = torch.rand(B, generator=generator, device=device)
        noise.offset = torch.rand(B, generator=generator, device=device)
        noise.eps2 = torch.randn(shape, generator=generator, device=device)
    if self_condition:
        noise.self_cond = torch.rand(B, generator=generator, device=device)
    if absorbing:
        noise.absorb = torch.rand(B, L, generator=generator, device=device)
        if partner:
            noise.absorb2 = torch.rand(B, L, generator=generator, device=device)
    return noise


def forward_noise(
    z0: torch.Tensor,
    t: torch.Tensor,
    alpha_bar: torch.Tensor,
    eps: torch.Tensor,
    target_mask: torch.Tensor,
    factor: float = 1.0,
    mask_state: torch.Tensor | None = None,
    rate: float = 0.0,
    absorb: torch.Tensor | None = None,
) -> torch.Tensor:
    """z_t of the training forward process: `q_sample` with the noise scaled by `factor` (Difformer's F).

    With a mask_state m (DiffuSeq-v2's soft absorbing state) the process runs around m:
    z_t = sqrt(ᾱ_t)·(z0 − m) + sqrt(1 − ᾱ_t)·F·ε + m on target positions, and each target position is
    replaced by m itself where absorb (B, L) uniform < rate·sqrt(1 − ᾱ_t). Source positions stay at z0.
    """
    if factor != 1.0:
        eps = eps * factor
    if mask_state is None:
        return q_sample(z0, t, alpha_bar, eps, target_mask)
    m = mask_state.to(z0.dtype)
    ab = alpha_bar[t].to(z0.dtype).view(-1, 1, 1)
    z_t = ab.sqrt() * (z0 - m) + (1 - ab).sqrt() * eps + m
    if rate > 0 and absorb is not None:
        hit = absorb.to(ab.dtype) < rate * (1 - ab[:, :, 0]).sqrt()  # (B, L)
        z_t = torch.where(hit.unsqueeze(-1), m.expand_as(z_t), z_t)
    return torch.where(target_mask.unsqueeze(-1), z_t, z0)


def _self_conditioned(
    model, z: torch.Tensor, t: torch.Tensor, rows: torch.Tensor | None, cond: dict[str, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0_hat, h) of f(z, t) (h: what the anchor loss scores, `Denoiser.forward`'s with_head), with
    self-conditioning: the examples in `rows` (B,) bool first run a no-grad pass (fed zeros) whose x0_hat,
    detached, the trained pass also reads; the others read zeros. rows None: plain f(z, t).
    cond: the per-position inputs the model reads besides z and t (`conditioning`), (B, L) each."""
    cond = cond or {}
    extra = dict(cond)
    if rows is None:
        out = model(z, t, **extra)
    else:
        prev = torch.zeros_like(z)
        if bool(rows.any()):
            with torch.no_grad():
                prev[rows] = model(z[rows], t[rows], **{k: v[rows] for k, v in cond.items()}).to(prev.dtype)
        out = model(z, t, prev, **extra)
    return out if isinstance(out, tuple) else (out, out)  # a regression model's head reads x0_hat itself


def _chunk2(pair: tuple[torch.Tensor, torch.Tensor]):
    """((a, a′), (h, h′)) of a batched pass over [z_t; z_t′]."""
    (a, a2), (h, h2) = (x.chunk(2) for x in pair)
    return (a, h), (a2, h2)


def _positions_mean(x: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """(B, L) -> (B,): the mean over all positions (weights None), or over those with weight 1."""
    if weights is None:
        return x.float().mean(1)
    return (x.float() * weights).sum(1) / weights.sum(1).clamp(min=1)


def _sq_error(a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean squared difference per example over positions × dims: all positions (as `mean_flat`) or the weighted ones."""
    if weights is None:
        return mean_flat((a - b) ** 2)
    return _positions_mean(((a - b) ** 2).float().mean(-1), weights)


def anchor_loss(model, x0_hat: torch.Tensor, ids: torch.Tensor, target_mask: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Difformer's anchor loss per example (B,): the tied head's cross-entropy on x0_hat against the tokens, averaged over target positions, with
    label smoothing ε:
    (1 − ε)·nll + ε·(lse − mean_v logit_v) = nll + ε·(logit_y − mean_v logit_v), where the mean logit is
    x·mean(E) + mean(b). Only the target rows go through the chunked head."""
    weight, bias = model.embedding.weight, getattr(model, "head_bias", None)
    rows = target_mask.reshape(-1).nonzero().squeeze(1)
    x = x0_hat.reshape(-1, x0_hat.shape[-1]).index_select(0, rows)
    y = ids.reshape(-1).index_select(0, rows)
    ce = tied_nll(x, weight, bias, y)
    if smoothing > 0:
        xf, wf = x.float(), weight.float()
        b = bias.float() if bias is not None else torch.zeros(weight.shape[0], device=weight.device)
        picked = (xf * wf[y]).sum(-1) + b[y]
        mean_logit = xf @ wf.mean(0) + b.mean()
        ce = ce + smoothing * (picked - mean_logit)
    per_row = torch.zeros(ids.numel(), dtype=ce.dtype, device=ce.device).index_copy(0, rows, ce)
    return _positions_mean(per_row.view(ids.shape), target_mask.float())


@dataclass
class _Inputs:
    """What the denoiser's passes of one loss evaluation share: E(w), z0, z_t and the options' draws."""

    x0: torch.Tensor  # E(w): (B, L, D)
    z0: torch.Tensor  # E(w) + σ0·ε0
    z_t: torch.Tensor
    sc_rows: torch.Tensor | None  # (B,) bool: the examples that self-condition (None: the model does not)
    cond: dict[str, torch.Tensor]  # what the model reads besides z_t and t (`conditioning`)
    mask_state: torch.Tensor | None  # the absorbing state m, for a model with one
    rate: float  # its absorbing rate


def _inputs(model, ids, target_mask, t, alpha_bar, noise: Noise | None, options: LossOptions) -> _Inputs:
    mcfg = getattr(model, "config", None)
    sc_prob, rate = getattr(mcfg, "self_condition", 0.0), getattr(mcfg, "absorbing", 0.0)
    cond = conditioning(model, ids, target_mask)
    mask_state = getattr(model, "mask_state", None)
    x0 = model.embed(ids)
    z0 = x0 + sigma(alpha_bar[:1]).to(x0.dtype) * (noise.eps0 if noise is not None else torch.randn_like(x0))
    eps = noise.eps if noise is not None else torch.randn_like(z0)
    absorb = None
    if mask_state is not None:
        absorb = noise.absorb if noise is not None else torch.rand(ids.shape, device=ids.device)
    z_t = forward_noise(z0, t, alpha_bar, eps, target_mask, options.noise_factor, mask_state, rate, absorb)
    sc_rows = None
    if sc_prob > 0:
        u = noise.self_cond if noise is not None else torch.rand(ids.shape[0], device=ids.device)
        # noise drawn without the self-conditioning draws (validation): no example self-conditions
        sc_rows = u < sc_prob if u is not None else torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    return _Inputs(x0, z0, z_t, sc_rows, cond, mask_state, rate)


def diffusion_loss(
    model,
    ids: torch.Tensor,
    target_mask: torch.Tensor,
    t: torch.Tensor,
    alpha_bar: torch.Tensor,
    dp_weight: float = 0.0,
    window: tuple[torch.Tensor, torch.Tensor] | None = None,
    dp_partner: str = "forward",
    noise: Noise | None = None,
    options: LossOptions = LossOptions(),
    hold: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Every loss term per example, shape (B,); "loss" is the one to optimise.

    ids, target_mask: (B, L); t: (B,) long; alpha_bar: (T,) on the model's device.
    With dp_weight > 0, `window` (from `dp_window`) gives the partner ranges.
    `noise` (from `draw_noise`) replaces the draws from the global generator.
    `options` adds the loss options of method.md §7; the model's own config says whether it
    self-conditions (`self_condition`) and has an absorbing state (`absorbing`, its `mask_state`).
    A classifier (model.config.x0_from "classifier") trains `classifier_loss` instead; `hold` (B, L): the target's
    [SEP] and padding of a model with a length head (`data.batches.held_end`).
    """
    if getattr(getattr(model, "config", None), "x0_from", "regression") == "classifier":
        return classifier_loss(model, ids, target_mask, t, alpha_bar, dp_weight, window, dp_partner, noise, options, hold)
    inp = _inputs(model, ids, target_mask, t, alpha_bar, noise, options)
    x0, z0 = inp.x0, inp.z0
    T = alpha_bar.shape[0]
    w = target_mask.float() if options.positions == "target" else None  # position weights of mse, decoder_nll, tT
    nll = tied_nll(z0.flatten(0, 1), model.embedding.weight, getattr(model, "head_bias", None), ids.flatten()).view(ids.shape)
    decoder_nll = nll.mean(1) if w is None else _positions_mean(nll, w)
    prior = (alpha_bar[T - 1].sqrt().to(z0.dtype) * z0) ** 2
    tT = mean_flat(prior) if w is None else _positions_mean(prior.float().mean(-1), w)
    anchor = (lambda head: anchor_loss(model, head, ids, target_mask, options.anchor_smoothing)) if options.anchor_weight > 0 else None

    if dp_weight <= 0:
        x0_hat, head = _self_conditioned(model, inp.z_t, t, inp.sc_rows, inp.cond)
        mse = _sq_error(x0, x0_hat, w)
        terms = {"loss": mse + decoder_nll + tT, "mse": mse, "decoder_nll": decoder_nll, "tT": tT}
        if anchor is not None:
            terms["anchor"] = anchor(head)
            terms["loss"] = terms["loss"] + options.anchor_weight * terms["anchor"]
        return terms

    (x0_hat, head), (x0_hat2, head2), valid = _with_partner(model, inp, ids, target_mask, t, alpha_bar, window, dp_partner, noise, options)
    mse = _sq_error(x0, x0_hat, w)
    mse2 = _sq_error(x0, x0_hat2, w)
    penalty = _sq_error(x0_hat2, x0_hat, w) * valid
    loss = 0.5 * (mse + mse2 + 2 * decoder_nll + 2 * tT + dp_weight * penalty)
    terms = {
        "loss": loss,
        "mse": mse,
        "mse_partner": mse2,
        "penalty": penalty,
        "decoder_nll": decoder_nll,
        "tT": tT,
        "partner_valid": valid.float(),
    }
    if anchor is not None:  # both passes, halved like their mse terms
        terms["anchor"] = 0.5 * (anchor(head) + anchor(head2))
        terms["loss"] = terms["loss"] + options.anchor_weight * terms["anchor"]
    return terms


def _with_partner(model, inp: _Inputs, ids, target_mask, t, alpha_bar, window, dp_partner: str, noise: Noise | None, options: LossOptions):
    """The Distance Penalty's two passes (method.md §3): ((x0_hat, head), (x0_hat′, head′), valid) at t and its partner t′."""
    if window is None:
        raise ValueError("the Distance Penalty needs the partner window (losses.dp_window)")
    z0, z_t, sc_rows, cond, mask_state = inp.z0, inp.z_t, inp.sc_rows, inp.cond, inp.mask_state
    t2, valid = partner_timesteps(t, *window, uniforms=(noise.side, noise.offset) if noise is not None else None)
    eps2 = noise.eps2 if noise is not None else None
    if dp_partner == "forward":  # reference code: same z0, fresh independent noise, one batched pass
        absorb2 = None
        if mask_state is not None:
            absorb2 = noise.absorb2 if noise is not None else torch.rand(ids.shape, device=ids.device)
        eps2 = eps2 if eps2 is not None else torch.randn_like(z0)
        z_t2 = forward_noise(z0, t2, alpha_bar, eps2, target_mask, options.noise_factor, mask_state, inp.rate, absorb2)
        rows = None if sc_rows is None else torch.cat([sc_rows, sc_rows])
        cond2 = {k: torch.cat([v, v]) for k, v in cond.items()}
        return (*_chunk2(_self_conditioned(model, torch.cat([z_t, z_t2]), torch.cat([t, t2]), rows, cond2)), valid)
    if dp_partner != "reverse":
        raise ValueError(f"unknown dp_partner {dp_partner!r}; expected forward or reverse")
    # paper wording: the partner comes from z_t through the model's own step
    first = _self_conditioned(model, z_t, t, sc_rows, cond)
    if eps2 is not None and options.noise_factor != 1.0:
        eps2 = eps2 * options.noise_factor
    shift = mask_state.to(z_t.dtype) if mask_state is not None else 0.0  # the process runs around m
    z_t2 = reverse_partner(z_t - shift, first[0].detach() - shift, t, t2, alpha_bar, eps2) + shift
    z_t2 = torch.where(target_mask.unsqueeze(-1), z_t2, z0)
    return first, _self_conditioned(model, z_t2, t2, sc_rows, cond), valid


def reverse_partner(
    z_t: torch.Tensor, x0_hat: torch.Tensor, t: torch.Tensor, t2: torch.Tensor, alpha_bar: torch.Tensor, noise: torch.Tensor | None = None
) -> torch.Tensor:
    """z_t′ made from z_t: for t′ < t the model's ancestral step (posterior q(z_t′ | z_t, x0_hat));
    for t′ > t the forward process q(z_t′ | z_t), which needs no model. For t′ = t, z_t itself."""
    ab_t = alpha_bar[t].view(-1, 1, 1).to(z_t.dtype)
    ab_2 = alpha_bar[t2].view(-1, 1, 1).to(z_t.dtype)
    noise = torch.randn_like(z_t) if noise is None else noise.to(z_t.dtype)
    # down: respaced ancestral step from t to t′ with the "large" variance β′ = 1 − ᾱ_t/ᾱ_t′
    beta = (1 - ab_t / ab_2).clamp(min=0)
    c_x0 = ab_2.sqrt() * beta / (1 - ab_t)
    c_zt = (1 - beta).sqrt() * (1 - ab_2) / (1 - ab_t)
    down = c_x0 * x0_hat + c_zt * z_t + beta.sqrt() * noise
    # up: forward transition from t to t′
    ratio = (ab_2 / ab_t).clamp(max=1)
    up = ratio.sqrt() * z_t + (1 - ratio).sqrt() * noise
    side = (t2 - t).view(-1, 1, 1)
    return torch.where(side < 0, down, torch.where(side > 0, up, z_t))


def _per_example(values: torch.Tensor, rows: torch.Tensor, B: int, L: int) -> torch.Tensor:
    """The mean per example (B,) of per-row values (N,) at flat positions `rows` (row-major over (B, L))."""
    example = rows // L
    total = torch.zeros(B, dtype=values.dtype, device=values.device).index_add_(0, example, values)
    count = torch.zeros(B, dtype=values.dtype, device=values.device).index_add_(0, example, torch.ones_like(values))
    return total / count.clamp(min=1)


def _classify(
    model, z: torch.Tensor, t: torch.Tensor, sc_rows: torch.Tensor | None, cond: dict[str, torch.Tensor], memory: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0_hat, logits at the written rows) of a classifier, self-conditioned on a no-grad first pass for the
    examples in `sc_rows` (the others read zeros)."""
    extra = dict(cond, memory=memory) if memory is not None else dict(cond)
    prev = None
    if sc_rows is not None:
        prev = torch.zeros_like(z)
        if bool(sc_rows.any()):
            with torch.no_grad():
                sub = {k: v[sc_rows] for k, v in extra.items()}
                prev[sc_rows] = model(z[sc_rows], t[sc_rows], **sub).to(prev.dtype)
    return model(z, t, prev, with_head=True, **extra)


def classifier_loss(
    model,
    ids: torch.Tensor,
    target_mask: torch.Tensor,
    t: torch.Tensor,
    alpha_bar: torch.Tensor,
    dp_weight: float = 0.0,
    window: tuple[torch.Tensor, torch.Tensor] | None = None,
    dp_partner: str = "forward",
    noise: Noise | None = None,
    options: LossOptions = LossOptions(),
    hold: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """CDCD's objective (Dieleman et al. 2022) per example (B,): z_t = √ᾱ_t·Ê(w) + √(1 − ᾱ_t)·ε at the written
    target positions (held ones and the source stay clean), and the cross-entropy `ce` of the classifier's logits
    against w there, averaged over them. No regression term, no rounding term: the embedding learns through the
    cross-entropy alone (the noisy input, the output prior and x0_hat).

    Distance Penalty (method.md §3 with the per-pass objective mse replaced by ce, as the classifier trains no mse):
      loss = ½·[ce(t) + ce(t′) + λ·1[t′≠t]·mean‖x0_hat(z_t′, t′) − x0_hat(z_t, t)‖²]
    with the partner drawn as for the base model; the penalty is over the written positions.
    A model with a length head (target_length head) adds `length`, the head's cross-entropy on the target's length
    minus the source's, weighted by options.length_weight."""
    B, L = ids.shape
    written = target_mask if hold is None else target_mask & ~hold
    rows = written.reshape(-1).nonzero().squeeze(1)
    targets = ids.reshape(-1).index_select(0, rows)
    x0 = model.embed(ids)
    if getattr(model, "process", "gaussian") == "mask":  # the masked process: CE on the masked tokens alone
        return _masked_loss(model, ids, target_mask, t, alpha_bar.shape[0], noise, options, hold, written, rows, x0)
    eps = noise.eps if noise is not None else torch.randn_like(x0)
    if options.noise_factor != 1.0:
        eps = eps * options.noise_factor
    z_t = q_sample(x0, t, alpha_bar, eps, written)
    cond = conditioning(model, ids, target_mask, hold)
    memory = model.encode(x0, target_mask, ids) if model.config.arch == "encdec" else None
    sc_rows = None
    if model.config.self_condition > 0:
        u = noise.self_cond if noise is not None else torch.rand(B, device=ids.device)
        sc_rows = u < model.config.self_condition if u is not None else torch.zeros(B, dtype=torch.bool, device=ids.device)

    def ce_of(logits: torch.Tensor) -> torch.Tensor:
        return _per_example(F.cross_entropy(logits.float(), targets, reduction="none"), rows, B, L)

    if dp_weight <= 0:
        _, logits = _classify(model, z_t, t, sc_rows, cond, memory)
        ce = ce_of(logits)
        terms = {"loss": ce, "ce": ce}
    else:
        if window is None:
            raise ValueError("the Distance Penalty needs the partner window (losses.dp_window)")
        t2, valid = partner_timesteps(t, *window, uniforms=(noise.side, noise.offset) if noise is not None else None)
        eps2 = noise.eps2 if noise is not None else torch.randn_like(x0)
        if options.noise_factor != 1.0:
            eps2 = eps2 * options.noise_factor
        if dp_partner == "forward":  # one batched pass over [z_t; z_t′]
            z_t2 = q_sample(x0, t2, alpha_bar, eps2, written)
            both = lambda v: None if v is None else torch.cat([v, v])
            x0_both, logits_both = _classify(
                model, torch.cat([z_t, z_t2]), torch.cat([t, t2]), both(sc_rows), {k: both(v) for k, v in cond.items()}, both(memory)
            )
            x0_hat, x0_hat2 = x0_both.chunk(2)
            n = rows.numel()  # the first batch's rows come first in row-major order
            logits, logits2 = logits_both[:n], logits_both[n:]
        elif dp_partner == "reverse":
            x0_hat, logits = _classify(model, z_t, t, sc_rows, cond, memory)
            z_t2 = reverse_partner(z_t, x0_hat.detach().to(z_t.dtype), t, t2, alpha_bar, eps2)
            z_t2 = torch.where(written.unsqueeze(-1), z_t2, x0)
            x0_hat2, logits2 = _classify(model, z_t2, t2, sc_rows, cond, memory)
        else:
            raise ValueError(f"unknown dp_partner {dp_partner!r}; expected forward or reverse")
        ce, ce2 = ce_of(logits), ce_of(logits2)
        penalty = _sq_error(x0_hat2, x0_hat, written.float()) * valid
        terms = {
            "loss": 0.5 * (ce + ce2 + dp_weight * penalty),
            "ce": ce,
            "ce_partner": ce2,
            "penalty": penalty,
            "partner_valid": valid.float(),
        }
    return _with_length(model, terms, memory, target_mask, written, options)


def _with_length(model, terms: dict[str, torch.Tensor], memory, target_mask, written, options: LossOptions) -> dict[str, torch.Tensor]:
    """Add the length head's term (a model with target_length head): the cross-entropy of its logits on the target's
    length minus the source's, weighted by options.length_weight."""
    if model.config.target_length == "head":
        K = (model.length_head[-1].out_features - 1) // 2
        offset = written.sum(1) - (~target_mask).sum(1) + 2  # target tokens − source tokens ([CLS], [SEP] are not)
        length = F.cross_entropy(model.length_logits(memory, target_mask), offset.clamp(-K, K) + K, reduction="none")
        terms["length"] = length
        terms["loss"] = terms["loss"] + options.length_weight * length
    return terms


def _masked_loss(model, ids, target_mask, t, T: int, noise: Noise | None, options: LossOptions, hold, written, rows, x0):
    """The masked process's objective (masked.py): each written token masked with probability (t + 1)/T, the
    classifier's cross-entropy on the masked ones, averaged over them per example (0 where none is masked)."""
    B, L = ids.shape
    u = noise.absorb if noise is not None and noise.absorb is not None else torch.rand(ids.shape, device=ids.device)
    z_t, masked = corrupt(x0, written, t, T, u, model.mask_embedding)
    memory = model.encode(x0, target_mask, ids)
    _, logits = model(z_t, t, with_head=True, memory=memory, **conditioning(model, ids, target_mask, hold))
    picked = masked.reshape(-1).index_select(0, rows)  # the masked rows among the written ones
    ce = F.cross_entropy(logits[picked].float(), ids.reshape(-1).index_select(0, rows)[picked], reduction="none")
    ce = _per_example(ce, rows[picked], B, L)
    return _with_length(model, {"loss": ce, "ce": ce}, memory, target_mask, written, options)
