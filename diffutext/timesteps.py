"""How training draws the timestep t of each example (PAPER.md §1).

`UniformTimesteps`: t ~ U{0, …, T−1}, every example weighted 1.
`LossAwareTimesteps`: DiffuSeq's default (improved-diffusion's LossSecondMomentResampler): keep the
last 10 losses seen at every t; once every t has 10, draw t with probability ∝ sqrt(E[loss²])
(mixed with 0.1% uniform) and weight each example by 1/(T·p_t), so the objective stays unbiased.
Until then it draws uniformly. Its history is part of the training state (saved, resumed).
"""

from __future__ import annotations

import torch

from .config import TimestepSampler, choices


class UniformTimesteps:
    learns = False  # no use for the losses

    def __init__(self, T: int, device: torch.device):
        self.T, self.device = T, device

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """t (B,) and the per-example loss weights (None: all 1)."""
        return torch.randint(0, self.T, (batch_size,), generator=generator, device=self.device), None

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        pass

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass


class LossAwareTimesteps:
    learns = True  # wants every example's loss through update()

    def __init__(self, T: int, device: torch.device, history: int = 10, uniform_prob: float = 0.001):
        self.T, self.device, self.history, self.uniform_prob = T, device, history, uniform_prob
        self.losses = torch.zeros(T, history, device=device)  # ring buffer of recent losses per t
        self.counts = torch.zeros(T, dtype=torch.long, device=device)  # losses seen per t

    def weights(self) -> torch.Tensor:
        """Sampling probabilities over t, shape (T,); uniform until every t has a full history (no host sync)."""
        warm = (self.counts >= self.history).all()
        w = self.losses.pow(2).mean(-1).sqrt()
        w = w / w.sum().clamp_min(1e-30)
        return torch.where(warm, w * (1 - self.uniform_prob) + self.uniform_prob / self.T, torch.full_like(w, 1.0 / self.T))

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        p = self.weights()
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        return t, 1.0 / (self.T * p[t])

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Record per-example losses at their timesteps (vectorised; repeats of a t fill successive slots)."""
        t_sorted, order = torch.sort(t, stable=True)
        _, counts = torch.unique_consecutive(t_sorted, return_counts=True)
        starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        rank = torch.arange(len(t), device=t.device) - starts  # occurrence index of each t in the batch
        slot = (self.counts[t_sorted] + rank) % self.history
        self.losses[t_sorted, slot] = losses.detach().float()[order]
        self.counts.index_add_(0, t_sorted, torch.ones_like(t_sorted))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"losses": self.losses.cpu(), "counts": self.counts.cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            self.losses.copy_(state["losses"])
            self.counts.copy_(state["counts"])


TIMESTEP_SAMPLERS: dict[TimestepSampler, type] = {"uniform": UniformTimesteps, "lossaware": LossAwareTimesteps}
assert tuple(TIMESTEP_SAMPLERS) == choices(TimestepSampler)


def make_timesteps(name: TimestepSampler, T: int, device: torch.device):
    if name not in TIMESTEP_SAMPLERS:
        raise ValueError(f"unknown timestep sampler {name!r}; expected {', '.join(TIMESTEP_SAMPLERS)}")
    return TIMESTEP_SAMPLERS[name](T, device)
