"""How training draws the timestep t of each example (method.md §1).

`UniformTimesteps`: t ~ U{0, …, T−1}, every example weighted 1.
`LossAwareTimesteps`: DiffuSeq's default (improved-diffusion's LossSecondMomentResampler): keep the
last 10 losses seen at every t; once every t has 10, draw t with probability ∝ sqrt(E[loss²])
(mixed with 0.1% uniform) and weight each example by 1/(T·p_t), so the objective stays unbiased.
Until then it draws uniformly. Its history is part of the training state (saved, resumed).
`ClippedTimesteps`: DiNoiSer's clipped minimum noise (yegcjs/DINOISER `ClippedSampler`): t uniform over
[t_min, T−1], where t_min is the first t whose noise, relative to the signal, reaches the embeddings' mean
squared nearest-neighbour distance per dimension, re-estimated from the live embedding table as it moves.
"""

from __future__ import annotations

from collections.abc import Callable

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


def nearest_neighbour_var(weight: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """mean_i min_{j≠i} ‖e_i − e_j‖² / D over the rows of weight (V, D), in row blocks (never V × V at once)."""
    w = weight.detach().float()
    sq = (w * w).sum(-1)
    mins = torch.empty(w.shape[0], device=w.device)
    for i in range(0, w.shape[0], block):
        d = torch.addmm(sq[None, :], w[i : i + block], w.t(), alpha=-2.0).add_(sq[i : i + block, None])  # (b, V)
        d[torch.arange(d.shape[0], device=w.device), torch.arange(i, i + d.shape[0], device=w.device)] = float("inf")
        mins[i : i + block] = d.amin(1)
    return mins.clamp(min=0).mean() / w.shape[1]


def clip_timestep(var: float, alpha_bar: torch.Tensor, noise_factor: float = 1.0) -> int:
    """The first t at which the training noise reaches the clip: F²·(1 − ᾱ_t)/ᾱ_t ≥ var, i.e. (F = 1) DiNoiSer's
    σ_t ≥ sqrt(var / (1 + var)). T − 1 if no t does."""
    ab = alpha_bar.double().cpu()
    reached = (noise_factor**2) * (1 - ab) >= var * ab
    return int(reached.nonzero()[0]) if bool(reached.any()) else len(ab) - 1


class ClippedTimesteps(UniformTimesteps):
    """t uniform over [t_min, T−1]: the same draw as UniformTimesteps, mapped onto the clipped range, with t_min
    re-estimated from `table()` (the live word embedding) every `every` calls (the table moves slowly; every
    call costs a V × V × D product)."""

    def __init__(
        self,
        T: int,
        device: torch.device,
        alpha_bar: torch.Tensor,
        table: Callable[[], torch.Tensor],
        noise_factor: float = 1.0,
        every: int = 10,
    ):
        super().__init__(T, device)
        self.alpha_bar, self.table, self.noise_factor, self.every = alpha_bar, table, noise_factor, every
        self.calls, self.t_min = 0, 0

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.calls % self.every == 0:
            self.t_min = clip_timestep(float(nearest_neighbour_var(self.table())), self.alpha_bar, self.noise_factor)
        self.calls += 1
        t, _ = super().sample(batch_size, generator)
        return self.t_min + t * (self.T - self.t_min) // self.T, None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"calls": torch.tensor(self.calls), "t_min": torch.tensor(self.t_min)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            self.calls, self.t_min = int(state["calls"]), int(state["t_min"])


class WarpedTimesteps:
    """CDCD's time warping (Dieleman et al. 2022; Plaid `train_cdcd.py`'s LossCDF): t drawn where the loss changes.

    The cross-entropy of a classifier grows with the noise level. Its curve over t, kept per bin of t (an average
    over each bin's recent losses) and made monotone (a running maximum over t), is read as a cumulative
    distribution: t = F⁻¹(u) puts each bin's share of draws in proportion to how much the loss rises across it
    (with `floor` of the draws spread uniformly), so that the loss falls linearly in u. Draws are stratified
    within a batch (u_i = (i + U)/B, one U), and unweighted: the warping chooses where to learn, as in CDCD. Until
    every bin has been seen, the curve is flat and the draws uniform. Its state is part of the training state."""

    learns = True

    def __init__(self, T: int, device: torch.device, bins: int = 64, rate: float = 0.1, floor: float = 0.1):
        self.T, self.device, self.rate, self.floor = T, device, rate, floor
        self.bins = min(bins, T)
        self.edges = torch.div(torch.arange(self.bins + 1, device=device) * T, self.bins, rounding_mode="floor")
        self.loss = torch.zeros(self.bins, device=device)  # the recent loss per bin of t
        self.seen = torch.zeros(self.bins, dtype=torch.long, device=device)

    def weights(self) -> torch.Tensor:
        """The share of draws per bin (bins,): the monotone loss curve's rise across each bin, plus the floor."""
        fitted = torch.cummax(self.loss, 0).values
        padded = torch.cat([fitted[:1], fitted, fitted[-1:]])
        rise = ((padded[2:] - padded[:-2]) / 2).clamp(min=0)  # central differences: the rise across each bin
        ready = bool((self.seen > 0).all()) and float(rise.sum()) > 0
        uniform = torch.full_like(self.loss, 1.0 / self.bins)
        if not ready:
            return uniform
        return (1 - self.floor) * rise / rise.sum() + self.floor * uniform

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        u = (torch.arange(batch_size, device=self.device) + torch.rand(1, generator=generator, device=self.device)) / batch_size
        cdf = torch.cat([torch.zeros(1, device=self.device), torch.cumsum(self.weights(), 0)])
        cdf = cdf / cdf[-1]
        j = (torch.searchsorted(cdf, u, right=True) - 1).clamp(0, self.bins - 1)
        frac = ((u - cdf[j]) / (cdf[j + 1] - cdf[j]).clamp(min=1e-12)).clamp(0, 1)
        lo, hi = self.edges[j], self.edges[j + 1]
        t = (lo + (frac * (hi - lo).float()).long()).clamp(max=self.T - 1)
        return t, None

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Fold this batch's per-example losses into their bins' averages."""
        b = t * self.bins // self.T
        total = torch.zeros(self.bins, device=self.device).index_add_(0, b, losses.detach().float())
        count = torch.zeros(self.bins, device=self.device).index_add_(0, b, torch.ones_like(losses, dtype=torch.float32))
        mean = total / count.clamp(min=1)
        hit = count > 0
        new = torch.where(self.seen > 0, (1 - self.rate) * self.loss + self.rate * mean, mean)
        self.loss = torch.where(hit, new, self.loss)
        self.seen += hit.long()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"loss": self.loss.cpu(), "seen": self.seen.cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            self.loss = state["loss"].to(self.device)
            self.seen = state["seen"].to(self.device)


TIMESTEP_SAMPLERS: dict[TimestepSampler, type] = {
    "uniform": UniformTimesteps,
    "lossaware": LossAwareTimesteps,
    "clipped": ClippedTimesteps,
    "warped": WarpedTimesteps,
}
assert tuple(TIMESTEP_SAMPLERS) == choices(TimestepSampler)


def make_timesteps(
    name: TimestepSampler,
    T: int,
    device: torch.device,
    alpha_bar: torch.Tensor | None = None,
    table: Callable[[], torch.Tensor] | None = None,
    noise_factor: float = 1.0,
):
    """The timestep sampler `name`; the clipped one reads the schedule and the live word embedding (`table()`)."""
    if name not in TIMESTEP_SAMPLERS:
        raise ValueError(f"unknown timestep sampler {name!r}; expected {', '.join(TIMESTEP_SAMPLERS)}")
    if name == "clipped":
        if alpha_bar is None or table is None:
            raise ValueError("the clipped timestep sampler needs alpha_bar and the word embedding")
        return ClippedTimesteps(T, device, alpha_bar, table, noise_factor)
    return TIMESTEP_SAMPLERS[name](T, device)
