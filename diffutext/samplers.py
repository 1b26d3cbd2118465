"""Samplers: a timestep schedule times an update rule, walked by one loop (method.md §4).

A schedule `(T, n) -> LongTensor` gives the visited timesteps, strictly descending from T−1.
An update `(z_t, x0_hat, abar_t, abar_prev, generator, state) -> z_prev` moves the sample from the
noise level of one visited timestep to the next (`abar_prev = 1` after the last, so a respaced
update then returns x0_hat); `state` (a `ChainState`, one per chain) is what a multistep update
such as DPM-Solver++ keeps between steps, and the one-step updates ignore it. `generate` walks the explicit (t, ᾱ_t, ᾱ_prev) triples: predict
x0_hat, optionally snap it to the nearest word embedding (one matrix product), update, and
re-impose the source. Adding a sampler is one function and one entry in SAMPLERS.

Hot path: the loop runs under `torch.inference_mode`, takes ᾱ as host floats (no device sync per
step), snaps only the target positions (the source is re-imposed anyway, so the result is the
same) in cache-sized blocks of the vocabulary, and can run the denoiser under bf16/fp16 autocast.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import get_args

import torch

from .config import SamplerName, SelfConditionInput, UpdateName, Variance, choices
from .device import autocast
from .model import Encoded, conditioning

# Step shares of ADS from the least to the most noisy third of [0, T): measured constants of the
# reference code (CODINNLG/Bridge_Gap_Diffusion), method.md §4.
ADS_SHARES = (0.08400242284240157, 0.36759523570876984, 0.5484023414488285)


class SamplerError(ValueError):
    """A sampler, schedule or option that cannot be used (too few steps, unknown name, ...)."""


# ---- schedules: (T, n) -> strictly descending LongTensor of visited timesteps ----


def full(T: int, n: int | None = None) -> torch.Tensor:
    """Every timestep, T−1 down to 0 (n is ignored)."""
    return torch.arange(T - 1, -1, -1)


def uniform(T: int, n: int) -> torch.Tensor:
    """n evenly spaced timesteps from T−1 to 0: round(i·(T−1)/(n−1))."""
    if n < 2:
        raise SamplerError("the uniform schedule needs at least 2 steps")
    if n > T:
        raise SamplerError(f"cannot visit {n} distinct timesteps out of T={T}")
    return torch.tensor([round(i * (T - 1) / (n - 1)) for i in range(n - 1, -1, -1)])


def every_kth(T: int, n: int) -> torch.Tensor:
    """DiffuSeq's `--step n` shortcut: T−1, T−1−k, ... with k = T // n (n points; may end above 0)."""
    if n < 1 or n > T:
        raise SamplerError(f"the skip schedule needs 1 <= steps <= T={T}")
    k = T // n
    return torch.arange(T - 1, -1, -k)[:n]


def _even_points(start: int, size: int, count: int) -> list[int]:
    """count points from start to start+size−1: start + round(i·stride), stride accumulated as a float."""
    if count == 1:
        return [start]
    stride = (size - 1) / (count - 1)
    points, cur = [], 0.0
    for _ in range(count):
        points.append(start + round(cur))
        cur += stride
    return points


def adaptive_decay(T: int, n: int, shares: tuple[float, float, float] = ADS_SHARES) -> torch.Tensor:
    """Adaptive Decay Sampling: few steps near the data, most at high noise (method.md §4).

    [0, T) is split into three contiguous thirds (sizes as numpy.array_split: 667, 667, 666 for
    T = 2000). n1 = max(round(p1·n), 1), n2 = max(round(p2·n), 1), n3 = n − n1 − n2. The two lower
    thirds take n_i + 1 evenly spaced points and drop the largest; the top third takes n3 points
    from its first index to T − 1.
    """
    if len(shares) != 3 or any(not math.isfinite(p) or p < 0 or p > 1 for p in shares):
        raise SamplerError("ADS shares must be three numbers in [0, 1] (fractions of the steps)")
    if n > T:  # before building any list: a huge n must fail at once, not after allocating it
        raise SamplerError(f"cannot visit {n} distinct timesteps out of T={T}")
    n1 = max(round(shares[0] * n), 1)
    n2 = max(round(shares[1] * n), 1)
    n3 = n - n1 - n2
    if n3 < 1:
        raise SamplerError(f"ADS with {n} steps and shares {tuple(shares)} leaves no step for the noisiest third; use more steps")
    sizes = [T // 3 + (1 if i < T % 3 else 0) for i in range(3)]
    starts = [0, sizes[0], sizes[0] + sizes[1]]
    points = _even_points(starts[0], sizes[0], n1 + 1)[:-1] + _even_points(starts[1], sizes[1], n2 + 1)[:-1]
    points += [T - 1] if n3 == 1 else _even_points(starts[2], sizes[2], n3)
    out = torch.tensor(points[::-1])
    if len(set(points)) != len(points):
        raise SamplerError(f"ADS with {n} steps visits a timestep twice at T={T}; use fewer steps")
    return out


# ---- updates: (z_t, x0_hat, abar_t, abar_prev, generator) -> z_prev ----


def _noise(z: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)


def ddpm_update(z_t, x0_hat, abar_t: float, abar_prev: float, generator=None, variance: str = "large", state=None):
    """Ancestral step of the respaced chain: β′ = 1 − ᾱ_t/ᾱ_prev, posterior mean, variance β′ ("large",
    DiffuSeq) or the posterior variance β′(1 − ᾱ_prev)/(1 − ᾱ_t) ("small")."""
    beta = 1.0 - abar_t / abar_prev
    mean = (math.sqrt(abar_prev) * beta / (1 - abar_t)) * x0_hat + (math.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar_t)) * z_t
    if abar_prev >= 1.0:
        return mean
    var = beta if variance == "large" else beta * (1 - abar_prev) / (1 - abar_t)
    return mean + math.sqrt(var) * _noise(z_t, generator)


def ddim_update(z_t, x0_hat, abar_t: float, abar_prev: float, generator=None, eta: float = 0.0, state=None):
    """DDIM (Song et al. 2021, eq. 12) from ᾱ_t to ᾱ_prev with stochasticity η."""
    eps = (z_t - math.sqrt(abar_t) * x0_hat) / math.sqrt(1 - abar_t)
    s2 = eta**2 * (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
    out = math.sqrt(abar_prev) * x0_hat + math.sqrt(max(1 - abar_prev - s2, 0.0)) * eps
    if s2 > 0:
        out = out + math.sqrt(s2) * _noise(z_t, generator)
    return out


@dataclass
class ChainState:
    """What a multistep update carries from one step of a chain to the next; `denoise` makes one per chain and
    hands it to every update (the one-step updates ignore it)."""

    x0_hat: torch.Tensor | None = None  # the previous step's prediction
    h: float | None = None  # the previous step's λ_prev − λ_t


def _lam(abar: float) -> float:
    """λ = log(√ᾱ/σ), half the log signal-to-noise ratio."""
    return 0.5 * (math.log(abar) - math.log1p(-abar))


def dpmpp_update(z_t, x0_hat, abar_t: float, abar_prev: float, generator=None, state: ChainState | None = None):
    """DPM-Solver++(2M) (Lu et al. 2022: multistep, second order, data prediction; method.md §7), the fast sampler of
    DiffuSeq-v2. With h = λ_prev − λ_t: z_prev = (σ_prev/σ_t)·z_t − √ᾱ_prev·(e^−h − 1)·D, where D = x0_hat on the
    first step and D = (1 + 1/(2r))·x0_hat − 1/(2r)·x0_hat_last, r = h_last/h, after it. The last respaced step
    (ᾱ_prev = 1, λ_prev = ∞) returns x0_hat: the second-order term has no limit there, and first order is what
    DPM-Solver does when it denoises to zero. Deterministic: the generator is not used."""
    if abar_prev >= 1.0:
        return x0_hat
    h = _lam(abar_prev) - _lam(abar_t)
    d = x0_hat
    if state is not None and state.x0_hat is not None:
        k = 0.5 * h / state.h  # 1/(2r), r = h_last/h
        d = (1 + k) * x0_hat - k * state.x0_hat
    if state is not None:
        state.x0_hat, state.h = x0_hat, h
    return math.sqrt((1 - abar_prev) / (1 - abar_t)) * z_t - (math.sqrt(abar_prev) * math.expm1(-h)) * d


# ---- samplers ----


@dataclass(frozen=True)
class Sampler:
    """A schedule times an update. respaced=False is DiffuSeq's shortcut: each step moves only to
    ᾱ_{t−1}, whatever the next visited timestep is."""

    schedule: Callable[[int, int], torch.Tensor]
    update: Callable = field(default=ddpm_update)
    respaced: bool = True

    def timesteps(self, T: int, steps: int) -> torch.Tensor:
        return self.schedule(T, steps)

    def triples(self, alpha_bar: torch.Tensor, steps: int) -> list[tuple[int, float, float]]:
        """(t, ᾱ_t, ᾱ_prev) for every visited t, as host numbers: no device sync in the loop."""
        ab = alpha_bar.double().cpu().tolist()
        ts = self.timesteps(len(ab), steps).tolist()
        if self.respaced:
            prev = [ab[t] for t in ts[1:]] + [1.0]
        else:
            prev = [ab[t - 1] if t > 0 else 1.0 for t in ts]
        return [(t, ab[t], p) for t, p in zip(ts, prev)]


SAMPLERS: dict[SamplerName, Sampler] = {
    "ddpm": Sampler(full, ddpm_update),
    "uniform": Sampler(uniform, ddpm_update),
    "skip": Sampler(every_kth, ddim_update, respaced=False),
    "ddim": Sampler(uniform, ddim_update),
    "ads": Sampler(adaptive_decay, ddpm_update),
    "dpm++": Sampler(uniform, dpmpp_update),  # DiffuSeq-v2's solver on a time-uniform schedule (it runs 10 steps)
}


def mask_update(*args, **kwargs):
    """The masked process's update (masked.py's Mask-Predict): `generate` runs it over the schedule's timesteps; it
    moves no Gaussian sample."""
    raise SamplerError("the mask update decodes a model trained with the masked process (diffusion.process mask)")


UPDATES: dict[UpdateName, Callable] = {"ddpm": ddpm_update, "ddim": ddim_update, "dpmpp": dpmpp_update, "mask": mask_update}
assert tuple(SAMPLERS) == get_args(SamplerName) and tuple(UPDATES) == get_args(UpdateName)


def make_sampler(
    name: SamplerName,
    update: UpdateName | None = None,
    variance: Variance = "large",
    eta: float = 0.0,
    ads_shares: tuple[float, float, float] | None = None,
) -> Sampler:
    """A preset of SAMPLERS with its options bound; `update` swaps the update rule (ADS × DDIM, say)."""
    for value, kind, what in ((name, SamplerName, "sampler"), (update, UpdateName, "update"), (variance, Variance, "variance")):
        if value not in choices(kind) and not (kind is UpdateName and value is None):
            raise SamplerError(f"unknown {what} {value!r}; choose one of {', '.join(choices(kind))}")
    if not (0 <= eta < math.inf):
        raise SamplerError("eta must be a finite number >= 0")
    base = SAMPLERS[name]
    schedule = partial(adaptive_decay, shares=tuple(ads_shares)) if (ads_shares and base.schedule is adaptive_decay) else base.schedule
    rule = base.update if update is None else UPDATES[update]
    bound = partial(rule, variance=variance) if rule is ddpm_update else partial(rule, eta=eta) if rule is ddim_update else rule
    return Sampler(schedule, bound, base.respaced)


# ---- the loop ----

ROW_BLOCK, VOCAB_BLOCK = 256, 4096  # a (rows × vocabulary) block of scores is 4 MB: it stays in cache


def nearest_indices(flat: torch.Tensor, weight_t: torch.Tensor, neg_half_sq_norm: torch.Tensor) -> torch.Tensor:
    """Index of the nearest row of the embedding table for every row of flat (N, D), in L2:
    argmin ‖x − e‖² = argmax (x·e − ½‖e‖²). weight_t is the table transposed, (D, V), contiguous.

    The same answer as one (N × V) product and an argmax, computed block by block with a running
    maximum (earlier blocks win ties, as argmax's first index does), so the scores never leave cache.
    """
    V = weight_t.shape[1]
    out = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
    for i in range(0, flat.shape[0], ROW_BLOCK):
        rows = flat[i : i + ROW_BLOCK]
        best, best_idx = torch.addmm(neg_half_sq_norm[:VOCAB_BLOCK], rows, weight_t[:, :VOCAB_BLOCK]).max(-1)
        for j in range(VOCAB_BLOCK, V, VOCAB_BLOCK):
            value, idx = torch.addmm(neg_half_sq_norm[j : j + VOCAB_BLOCK], rows, weight_t[:, j : j + VOCAB_BLOCK]).max(-1)
            better = value > best
            best = torch.where(better, value, best)
            best_idx = torch.where(better, idx + j, best_idx)
        out[i : i + ROW_BLOCK] = best_idx
    return out


def head_indices(model, rows: torch.Tensor, banned: torch.Tensor | None = None) -> torch.Tensor:
    """argmax of the tied head for every row of rows (N, D), in row blocks (never the whole N × V logits);
    `banned` token ids are never picked."""

    def block(x):
        logits = model.logits(x)
        return (logits if banned is None else logits.index_fill(-1, banned, float("-inf"))).argmax(-1)

    return torch.cat(
        [block(rows[i : i + ROW_BLOCK]) for i in range(0, rows.shape[0], ROW_BLOCK)]
        or [torch.empty(0, dtype=torch.long, device=rows.device)]
    )


def written(target_mask: torch.Tensor, hold: torch.Tensor | None) -> torch.Tensor:
    """The positions the chain writes: the target side less the held ones."""
    return target_mask if hold is None else target_mask & ~hold


def cedi_timesteps(T: int, n: int, end: float) -> list[int]:
    """The timesteps a condition-enhanced denoiser is told over n steps: T − 1 down to end·(T − 1), evenly spaced."""
    if not 0.0 <= end <= 1.0:
        raise SamplerError("cedi must be a share of T in [0, 1] (DINOISER: 0.99)")
    top = T - 1
    return [top] if n == 1 else [round(top - i * top * (1 - end) / (n - 1)) for i in range(n)]


class Predictor:
    """The denoiser as a chain sees it (k-diffusion's wrapper pattern): a sample z_t and a timestep in, x0_hat out,
    snapped to word embeddings. It holds what stays fixed over one chain, so that `denoise` is a short loop: the clean
    source and the held positions (re-imposed after every update by `impose`), the conditioning (an encoder–decoder's
    source, encoded once), the embedding table that snapping reads, and what one step hands the next (the
    self-conditioning input, zeros at the first step).

    hold (B, L) bool: target positions kept at the clean embedding of their ids throughout, as the source is (a fixed
    length's [SEP] and padding); the model still reads the whole target side as such (its target_mask). banned: token
    ids that snapping never picks (the special tokens, where the length is fixed). `precision` bf16/fp16 runs the
    denoiser under autocast; the chain itself (z, the updates, the snapping) stays in float32.

    A classifier (x0_from classifier) snaps by its own logits' argmax, and always at the last step, so that the final
    sample is the embedding of the tokens it chose. Options of the model (method.md §7): a self-conditioned model
    (config.self_condition > 0) is fed the previous step's x0_hat, after snapping ("clamped", Difformer) or before it
    ("raw", SeqDiffuSeq, Plaid). clamp_by "head" snaps x0_hat to the embedding of the tied head's argmax (Difformer)
    instead of the nearest embedding in L2 (DiffuSeq, "nearest"). A model with an absorbing state m (`mask_state`)
    starts from z_T = ε + m and every update runs around m (`shift`), as its forward process does.
    """

    def __init__(
        self,
        model,
        ids: torch.Tensor,
        target_mask: torch.Tensor,
        *,
        hold: torch.Tensor | None = None,
        banned: torch.Tensor | None = None,
        clamp: bool = True,
        clamp_by: str = "nearest",
        self_condition_input: str = "clamped",
        precision: str = "fp32",
    ):
        if self_condition_input not in choices(SelfConditionInput):
            raise SamplerError(f"unknown self_condition_input {self_condition_input!r}; expected {', '.join(choices(SelfConditionInput))}")
        if clamp_by not in ("nearest", "head"):  # "auto" is resolved against the run's config before decoding
            raise SamplerError(f"unknown clamp_by {clamp_by!r}; expected nearest or head")
        config = getattr(model, "config", None)
        self.model, self.banned, self.clamp, self.clamp_by, self.sc_input = model, banned, clamp, clamp_by, self_condition_input
        self.device, self.precision = ids.device, precision
        self.self_cond = getattr(config, "self_condition", 0.0) > 0
        self.classifier = getattr(config, "x0_from", "regression") == "classifier"
        self.extra = conditioning(model, ids, target_mask, hold)
        if self.classifier:
            self.extra["with_head"] = True  # (x0_hat, its logits at the written rows)
        m = getattr(model, "mask_state", None)
        self.shift = m.detach().float() if m is not None else None
        self.weight = (model.table() if hasattr(model, "table") else model.embedding.weight).float()
        self.weight_t = self.weight.t().contiguous()  # (D, V)
        self.neg_half_sq_norm = -0.5 * (self.weight * self.weight).sum(-1)
        if banned is not None:
            self.neg_half_sq_norm.index_fill_(0, banned, float("-inf"))
        self.x_src = model.embed(ids).float()  # (B, L, D)
        free = written(target_mask, hold)
        self.mask = free.unsqueeze(-1)
        self.target_rows = free.reshape(-1).nonzero().squeeze(1)  # once per chain, not per step
        self.prev = torch.zeros_like(self.x_src) if self.self_cond else None
        self.t_vec = torch.empty(ids.shape[0], dtype=torch.long, device=ids.device)
        if getattr(config, "arch", "") == "encdec":  # the encoded source is the same at every step: encode it once
            with autocast(ids.device, precision):
                self.extra["memory"] = Encoded(model.encode(self.x_src, target_mask, ids))

    def start(self, generator: torch.Generator | None) -> torch.Tensor:
        """z_T: noise at the written target positions (around the absorbing state, if any), the clean source elsewhere."""
        z = _noise(self.x_src, generator)
        return self.impose(z if self.shift is None else z + self.shift)

    def impose(self, z: torch.Tensor) -> torch.Tensor:
        """The source and held positions put back at their clean embeddings."""
        return torch.where(self.mask, z, self.x_src)

    def __call__(self, z: torch.Tensor, t: int, last: bool = False) -> torch.Tensor:
        """x0_hat (B, L, D) in float32, snapped at the target rows where clamping is on (and a classifier's at `last`)."""
        with autocast(self.device, self.precision):
            t_vec = self.t_vec.fill_(t)
            out = self.model(z, t_vec, self.prev, **self.extra) if self.self_cond else self.model(z, t_vec, **self.extra)
        x0_hat, logits = out if self.classifier else (out, None)
        x0_hat = x0_hat.float()
        if self.self_cond and (self.sc_input == "raw" or not self.clamp):
            self.prev = x0_hat.clone()
        if self.clamp or (self.classifier and last):  # the target rows only: the source rows are re-imposed anyway
            flat = x0_hat.reshape(-1, x0_hat.shape[-1])
            if self.classifier:  # the classifier's own argmax (its logits are those of the written rows, in order)
                banned = self.banned  # banned in place: the logits are this step's own, read by nothing else
                picked = (logits if banned is None else logits.index_fill_(-1, banned, float("-inf"))).argmax(-1)
            else:
                rows = flat.index_select(0, self.target_rows)
                if self.clamp_by == "nearest":
                    picked = nearest_indices(rows, self.weight_t, self.neg_half_sq_norm)
                else:
                    picked = head_indices(self.model, rows, self.banned)
            flat.index_copy_(0, self.target_rows, self.weight.index_select(0, picked))
            if self.self_cond and self.sc_input == "clamped":
                self.prev = x0_hat
        return x0_hat


@torch.inference_mode()
def denoise(
    model,
    alpha_bar: torch.Tensor,
    sampler: Sampler,
    steps: int,
    ids: torch.Tensor,
    target_mask: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[int, int], None] | None = None,
    cedi: float | None = None,
    **options,
) -> torch.Tensor:
    """Run the reverse chain on one batch and return the final continuous sample z (B, L, D).

    ids/target_mask (B, L) carry the source; target positions start from z_T ~ N(0, I), source (and held) positions
    keep their clean embeddings throughout. `options` are the `Predictor`'s (hold, banned, clamp, clamp_by,
    self_condition_input, precision). cedi: DINOISER's condition-enhanced denoiser (Ye et al. 2023, its
    `--solver cedi --denoise-end 0.99`): the denoiser is told timesteps from T − 1 down to cedi·(T − 1) evenly over
    the visited steps, high noise throughout, so that it leans on the source, while the sample itself follows the
    sampler's schedule (None: the denoiser is told the sample's own t).
    """
    x0 = Predictor(model, ids, target_mask, **options)
    z = x0.start(generator)
    triples = sampler.triples(alpha_bar, steps)
    told = [t for t, _, _ in triples] if cedi is None else cedi_timesteps(len(alpha_bar), len(triples), cedi)
    state = ChainState()  # what a multistep update (dpm++) keeps between steps
    m = x0.shift
    for i, (t, abar_t, abar_prev) in enumerate(triples):
        x0_hat = x0(z, told[i], last=i == len(triples) - 1)
        if m is None:
            z = x0.impose(sampler.update(z, x0_hat, abar_t, abar_prev, generator, state=state))
        else:  # around the absorbing state
            z = x0.impose(sampler.update(z - m, x0_hat - m, abar_t, abar_prev, generator, state=state) + m)
        if callback is not None:
            callback(i, t)
    return z


@torch.inference_mode()
def generate(
    model,
    alpha_bar: torch.Tensor,
    sampler: Sampler,
    steps: int,
    ids: torch.Tensor,
    target_mask: torch.Tensor,
    *,
    hold: torch.Tensor | None = None,
    banned: torch.Tensor | None = None,
    precision: str = "fp32",
    callback: Callable[[int, int], None] | None = None,
    **chain,
) -> torch.Tensor:
    """Decode one batch to token ids (B, L): the tied head's argmax (never a `banned` id) on the final sample at target
    positions, computed in row blocks (never the whole (B·L × V) logits); source (and held) positions keep ids.
    A model of the masked process decodes by Mask-Predict over the sampler's timesteps (its update must be mask).
    `chain`: the rest of `denoise`'s options (clamp, generator, self_condition_input, clamp_by, cedi)."""
    masked = getattr(model, "process", "gaussian") == "mask"
    if masked != (sampler.update is mask_update):
        raise SamplerError(
            "a model trained with the masked process decodes with --update mask, and only it does"
            if masked
            else "--update mask decodes only a model trained with the masked process"
        )
    if masked:
        from .masked import mask_predict

        return mask_predict(
            model, sampler.timesteps(len(alpha_bar), steps).tolist(), len(alpha_bar), ids, target_mask, hold, banned, precision, callback
        )
    z = denoise(
        model, alpha_bar, sampler, steps, ids, target_mask, hold=hold, banned=banned, precision=precision, callback=callback, **chain
    )
    rows = written(target_mask, hold).reshape(-1).nonzero().squeeze(1)
    picked = head_indices(model, z.reshape(-1, z.shape[-1]).index_select(0, rows), banned)
    out = ids.clone()
    out.view(-1).index_copy_(0, rows, picked)
    return out
