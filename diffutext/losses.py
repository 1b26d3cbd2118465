"""Training losses: DiffuSeq's terms (PAPER.md §1) and the Distance Penalty (PAPER.md §3).

Per example, with E(w) the word embeddings of the packed sequence:
  z0 = E(w) + σ0·ε,   z_t = q_sample(z0, t)            (source positions stay at z0)
  mse(t)       = mean over positions × dims of (E(w) − f(z_t, t))²
  decoder_nll  = cross-entropy of the tied head on z0 against w (the rounding term)
  tT           = mean (sqrt(ᾱ_{T−1})·z0)²               (prior term)
  base loss    = mse + decoder_nll + tT

Distance Penalty, with partner timestep t′ drawn from the noise-level window of t:
  loss = ½·[mse(t) + mse(t′) + 2·decoder_nll + 2·tT + λ·1[t′≠t]·mean‖f(z_t′,t′) − f(z_t,t)‖²]
With λ = 0 the partner pass is skipped and the loss is the base loss exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .diffusion import q_sample, sigma


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch: (B, ...) -> (B,)."""
    return x.float().mean(dim=tuple(range(1, x.dim())))


def dp_window(alpha_bar: torch.Tensor, delta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """U(t) = largest s ≥ t with σ_s − σ_t ≤ δ; D(t) = smallest s ≤ t with σ_t − σ_s ≤ δ. Both (T,) long.

    σ_t is non-decreasing in t, so both are binary searches over the σ table.
    """
    s = sigma(alpha_bar.double())
    t = torch.arange(len(s))
    upper = torch.searchsorted(s, s + delta, right=True) - 1  # last index with σ ≤ σ_t + δ
    lower = torch.searchsorted(s, s - delta, right=False)  # first index with σ ≥ σ_t − δ
    return torch.maximum(upper, t), torch.minimum(lower, t)


def partner_timesteps(t: torch.Tensor, upper: torch.Tensor, lower: torch.Tensor,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw t′ per example: with probability ½ uniformly from [t+1, U(t)], else from [D(t), t−1].

    Returns (t′, valid); where the chosen range is empty, t′ = t and valid is False.
    """
    u, d = upper[t], lower[t]
    up = torch.rand(t.shape, generator=generator, device=t.device) < 0.5
    r = torch.rand(t.shape, generator=generator, device=t.device)
    size = torch.where(up, u - t, t - d)  # number of candidates on the chosen side
    start = torch.where(up, t + 1, d)
    offset = (r * size).floor().long().clamp(max=(size - 1).clamp(min=0))
    valid = size > 0
    return torch.where(valid, start + offset, t), valid


def diffusion_loss(model, ids: torch.Tensor, target_mask: torch.Tensor, t: torch.Tensor, alpha_bar: torch.Tensor,
                   dp_weight: float = 0.0, window: tuple[torch.Tensor, torch.Tensor] | None = None,
                   dp_partner: str = "forward") -> dict[str, torch.Tensor]:
    """Every loss term per example, shape (B,); "loss" is the one to optimise.

    ids, target_mask: (B, L); t: (B,) long; alpha_bar: (T,) on the model's device.
    With dp_weight > 0, `window` (from `dp_window`) gives the partner ranges.
    """
    x0 = model.embed(ids)  # E(w): (B, L, D)
    z0 = x0 + sigma(alpha_bar[:1]).to(x0.dtype) * torch.randn_like(x0)
    z_t = q_sample(z0, t, alpha_bar, torch.randn_like(z0), target_mask)
    T = alpha_bar.shape[0]
    decoder_nll = F.cross_entropy(model.logits(z0).flatten(0, 1).float(), ids.flatten(), reduction="none").view(ids.shape).mean(1)
    tT = mean_flat((alpha_bar[T - 1].sqrt().to(z0.dtype) * z0) ** 2)

    if dp_weight <= 0:
        x0_hat = model(z_t, t)
        mse = mean_flat((x0 - x0_hat) ** 2)
        return {"loss": mse + decoder_nll + tT, "mse": mse, "decoder_nll": decoder_nll, "tT": tT}

    if window is None:
        raise ValueError("the Distance Penalty needs the partner window (losses.dp_window)")
    t2, valid = partner_timesteps(t, *window)
    if dp_partner == "forward":  # reference code: same z0, fresh independent noise, one batched pass
        z_t2 = q_sample(z0, t2, alpha_bar, torch.randn_like(z0), target_mask)
        x0_hat, x0_hat2 = model(torch.cat([z_t, z_t2]), torch.cat([t, t2])).chunk(2)
    elif dp_partner == "reverse":  # paper wording: the partner comes from z_t through the model's own step
        x0_hat = model(z_t, t)
        z_t2 = reverse_partner(z_t, x0_hat.detach(), t, t2, alpha_bar)
        z_t2 = torch.where(target_mask.unsqueeze(-1), z_t2, z0)
        x0_hat2 = model(z_t2, t2)
    else:
        raise ValueError(f"unknown dp_partner {dp_partner!r}; expected forward or reverse")
    mse = mean_flat((x0 - x0_hat) ** 2)
    mse2 = mean_flat((x0 - x0_hat2) ** 2)
    penalty = mean_flat((x0_hat2 - x0_hat) ** 2) * valid
    loss = 0.5 * (mse + mse2 + 2 * decoder_nll + 2 * tT + dp_weight * penalty)
    return {"loss": loss, "mse": mse, "mse_partner": mse2, "penalty": penalty, "decoder_nll": decoder_nll, "tT": tT,
            "partner_valid": valid.float()}


def reverse_partner(z_t: torch.Tensor, x0_hat: torch.Tensor, t: torch.Tensor, t2: torch.Tensor,
                    alpha_bar: torch.Tensor) -> torch.Tensor:
    """z_t′ made from z_t: for t′ < t the model's ancestral step (posterior q(z_t′ | z_t, x0_hat));
    for t′ > t the forward process q(z_t′ | z_t), which needs no model. For t′ = t, z_t itself."""
    ab_t = alpha_bar[t].view(-1, 1, 1).to(z_t.dtype)
    ab_2 = alpha_bar[t2].view(-1, 1, 1).to(z_t.dtype)
    noise = torch.randn_like(z_t)
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
