"""The Gaussian diffusion process over embeddings (method.md §1).

`alpha_bar_table` builds ᾱ_t for t = 0..T-1 from a named schedule exactly as DiffuSeq does
(β_t = min(1 − ᾱ((t+1)/T)/ᾱ(t/T), 0.999), ᾱ_t = ∏(1 − β)); `q_sample` noises the target side
only ("partial noising"); `sigma` is the noise level σ_t = sqrt(1 − ᾱ_t) the Distance Penalty's
window and the plots use.
"""

from __future__ import annotations

import math

import torch

from .config import Schedule, choices

MAX_BETA = 0.999


ALPHA_BAR = {  # ᾱ(s) of s = t/T for the schedules defined by ᾱ; "linear" is defined by its β
    "sqrt": lambda s: 1.0 - math.sqrt(s + 1e-4),  # Diffusion-LM
    "cosine": lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2,  # Nichol & Dhariwal
}


def betas(schedule: Schedule, T: int) -> torch.Tensor:
    """β_1..β_T in float64."""
    if schedule not in choices(Schedule):
        raise ValueError(f"unknown schedule {schedule!r}; expected {', '.join(choices(Schedule))}")
    if schedule == "linear":  # Ho et al., scaled to T steps
        scale = 1000.0 / T
        return torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64)
    f = ALPHA_BAR[schedule]
    # ᾱ(s) of the sqrt schedule reaches 0 at s = 0.9999: for T > 10000 cap β there instead of dividing by <= 0
    return torch.tensor(
        [min(1.0 - f((i + 1) / T) / f(i / T), MAX_BETA) if f(i / T) > 0 else MAX_BETA for i in range(T)], dtype=torch.float64
    )


def alpha_bar_table(schedule: Schedule, T: int) -> torch.Tensor:
    """ᾱ_t for t = 0..T-1, float64, shape (T,)."""
    return torch.cumprod(1.0 - betas(schedule, T), dim=0)


def sigma(alpha_bar: torch.Tensor) -> torch.Tensor:
    """Noise level σ_t = sqrt(1 − ᾱ_t)."""
    return (1.0 - alpha_bar).sqrt()


def _bcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def q_sample(x0: torch.Tensor, t: torch.Tensor, alpha_bar: torch.Tensor, eps: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """z_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·eps on target positions; source positions stay at x0.

    x0, eps: (B, L, D); t: (B,) long; target_mask: (B, L) bool.
    """
    ab = alpha_bar[t]
    z_t = _bcast(ab.sqrt(), x0) * x0 + _bcast((1 - ab).sqrt(), x0) * eps
    return torch.where(target_mask.unsqueeze(-1), z_t, x0)
