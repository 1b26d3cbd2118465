"""DiffuSeq's loss terms and the Distance Penalty (method.md §1, §3)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffutext.config import ModelConfig
from diffutext.diffusion import alpha_bar_table, q_sample
from diffutext.losses import diffusion_loss, dp_window, draw_noise, partner_timesteps, reverse_partner
from diffutext.model import Denoiser

AB = alpha_bar_table("sqrt", 2000).float()
WINDOW = dp_window(alpha_bar_table("sqrt", 2000), 0.05)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return Denoiser(ModelConfig(vocab_size=50, hidden_dim=8, width=16, layers=1, heads=2, ffn=32, dropout=0.0, seq_len=12, time_dim=8))


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (4, 12), generator=g)
    mask = torch.zeros(4, 12, dtype=torch.bool)
    mask[:, 6:] = True
    t = torch.tensor([0, 100, 1000, 1999])
    return ids, mask, t


def test_lambda_zero_is_the_base_loss_exactly():
    model = tiny_model()
    ids, mask, t = batch()
    torch.manual_seed(7)
    terms = diffusion_loss(model, ids, mask, t, AB, dp_weight=0.0, window=WINDOW)
    # The same computation written out from method.md §1 with the same noise draws.
    torch.manual_seed(7)
    x0 = model.embed(ids)
    z0 = x0 + (1 - AB[0]).sqrt() * torch.randn_like(x0)
    z_t = q_sample(z0, t, AB, torch.randn_like(z0), mask)
    mse = ((x0 - model(z_t, t)) ** 2).mean(dim=(1, 2))
    nll = F.cross_entropy(model.logits(z0).transpose(1, 2), ids, reduction="none").mean(1)
    tT = ((AB[-1].sqrt() * z0) ** 2).mean(dim=(1, 2))
    assert torch.allclose(terms["loss"], mse + nll + tT, rtol=1e-6, atol=0)
    assert set(terms) == {"loss", "mse", "decoder_nll", "tT"}
    # λ = 0 skips the partner pass: one forward call, and the same numbers as the plain base loss
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    torch.manual_seed(7)
    again = diffusion_loss(model, ids, mask, t, AB, dp_weight=0.0, window=WINDOW, dp_partner="reverse")
    handle.remove()
    torch.manual_seed(7)
    base = diffusion_loss(model, ids, mask, t, AB)
    assert len(calls) == 1 and torch.equal(again["loss"], base["loss"]) and torch.equal(again["loss"], terms["loss"])


# ---- the Distance Penalty recomputed from method.md §3 with fixed noise ----

T = 2000
AB64 = alpha_bar_table("sqrt", T)  # float64: the window is defined on it


def window_by_walk(t: int, delta: float = 0.05) -> tuple[int, int]:
    """D(t), U(t) of §3.1 by walking the σ table outwards from t (no search)."""
    s = (1 - AB64).sqrt()
    up, down = t, t
    while up + 1 < T and s[up + 1] - s[t] <= delta:
        up += 1
    while down > 0 and s[t] - s[down - 1] <= delta:
        down -= 1
    return down, up


def partner_by_hand(t: int, side: float, offset: float) -> int:
    """§3.2: the upper side [t+1, U(t)] when side < ½, else the lower [D(t), t−1], a uniform pick in it
    (offset in [0, 1) times the count, floored); t itself when that side is empty."""
    down, up = window_by_walk(t)
    first, count = (t + 1, up - t) if side < 0.5 else (down, t - down)
    return first + math.floor(offset * count) if count else t


def posterior_by_precision(z_t, x0_hat, ab_t: float, ab_2: float):
    """Mean of q(z_t′ | z_t, x0) for t′ < t on the respaced chain, from precisions: the prior
    z_t′ ~ N(√ᾱ_t′·x0, 1 − ᾱ_t′) times the transition z_t ~ N(√(ᾱ_t/ᾱ_t′)·z_t′, 1 − ᾱ_t/ᾱ_t′)."""
    a, prior_var = math.sqrt(ab_2), 1 - ab_2
    r, step_var = math.sqrt(ab_t / ab_2), 1 - ab_t / ab_2
    var = 1 / (1 / prior_var + r * r / step_var)
    return var * (a * x0_hat / prior_var + r * z_t / step_var), step_var  # the ancestral step's variance β′ ("large")


# t = 100 draws up, 500 and 1000 draw down, 1999 draws up and 0 draws down (both empty: masked)
DP_T = [100, 500, 1000, 1999, 0]
DP_SIDE = [0.2, 0.7, 0.9, 0.1, 0.6]
DP_OFFSET = [0.5, 0.25, 0.999, 0.3, 0.4]  # 0.999: the last candidate, t − 1


def dp_case():
    torch.manual_seed(0)
    model = Denoiser(ModelConfig(vocab_size=50, hidden_dim=8, width=16, layers=1, heads=2, ffn=32, dropout=0.0, seq_len=12, time_dim=8))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (5, 12), generator=g)
    mask = torch.zeros(5, 12, dtype=torch.bool)
    mask[:, 5:] = True
    mask[4, 3:] = True  # target sides of different lengths
    noise = draw_noise((5, 12, 8), True, g)
    noise.side, noise.offset = torch.tensor(DP_SIDE), torch.tensor(DP_OFFSET)
    return model, ids, mask, torch.tensor(DP_T), noise


def test_partner_timesteps_follow_the_window_rule_written_out():
    assert [window_by_walk(t) for t in (100, 500, 1000)] == [(65, 148), (375, 654), (785, 1256)]  # §3's examples
    model, ids, mask, t, noise = dp_case()
    t2, valid = partner_timesteps(t, *WINDOW, uniforms=(noise.side, noise.offset))
    assert t2.tolist() == [partner_by_hand(*a) for a in zip(DP_T, DP_SIDE, DP_OFFSET)] == [125, 406, 999, 1999, 0]
    assert valid.tolist() == [True, True, True, False, False]


@pytest.mark.parametrize("partner", ["forward", "reverse"])
def test_distance_penalty_loss_equals_paper_section_3_recomputed(partner):
    """Every term of diffusion_loss with the Distance Penalty, recomputed with plain torch ops from
    method.md §1 and §3 on the same noise: mse(t), mse(t′), decoder_nll, tT, the penalty (mean over
    positions × dims, masked where t′ = t) and ½·[mse + mse′ + 2·nll + 2·tT + λ·penalty]."""
    lam = 1.5
    model, ids, mask, t, noise = dp_case()
    terms = diffusion_loss(model, ids, mask, t, AB, dp_weight=lam, window=WINDOW, dp_partner=partner, noise=noise)

    t2 = [partner_by_hand(*a) for a in zip(DP_T, DP_SIDE, DP_OFFSET)]
    valid = torch.tensor([float(b != a) for a, b in zip(DP_T, t2)])
    m = mask[..., None]
    x0 = model.embed(ids)
    z0 = x0 + math.sqrt(1 - AB[0].item()) * noise.eps0
    ab = [AB[i].item() for i in DP_T]
    ab2 = [AB[i].item() for i in t2]
    z_t = torch.stack([torch.where(m[b], math.sqrt(ab[b]) * z0[b] + math.sqrt(1 - ab[b]) * noise.eps[b], z0[b]) for b in range(5)])
    x0_hat = model(z_t, t)
    if partner == "forward":  # §3.3, reference code: the same z0, the partner's own noise
        z_2 = torch.stack([math.sqrt(ab2[b]) * z0[b] + math.sqrt(1 - ab2[b]) * noise.eps2[b] for b in range(5)])
    else:  # §3.3, paper wording: a reverse step from z_t for t′ < t, the forward transition for t′ > t
        rows = []
        for b in range(5):
            if t2[b] < DP_T[b]:
                mean, var = posterior_by_precision(z_t[b], x0_hat[b].detach(), ab[b], ab2[b])
                rows.append(mean + math.sqrt(var) * noise.eps2[b])
            elif t2[b] > DP_T[b]:
                rows.append(math.sqrt(ab2[b] / ab[b]) * z_t[b] + math.sqrt(1 - ab2[b] / ab[b]) * noise.eps2[b])
            else:
                rows.append(z_t[b])
        z_2 = torch.stack(rows)
        assert torch.allclose(reverse_partner(z_t, x0_hat.detach(), t, torch.tensor(t2), AB, noise.eps2), z_2, rtol=1e-5, atol=1e-6)
    z_2 = torch.where(m, z_2, z0)  # the source stays at z0 in the partner pass too
    x0_hat2 = model(z_2, torch.tensor(t2))

    mse = ((x0 - x0_hat) ** 2).mean(dim=(1, 2))
    mse2 = ((x0 - x0_hat2) ** 2).mean(dim=(1, 2))
    nll = F.cross_entropy(model.logits(z0).transpose(1, 2), ids, reduction="none").mean(1)
    tT = ((math.sqrt(AB[-1].item()) * z0) ** 2).mean(dim=(1, 2))
    penalty = ((x0_hat2 - x0_hat) ** 2).mean(dim=(1, 2)) * valid
    loss = 0.5 * (mse + mse2 + 2 * nll + 2 * tT + lam * penalty)
    expect = {"loss": loss, "mse": mse, "mse_partner": mse2, "penalty": penalty, "decoder_nll": nll, "tT": tT, "partner_valid": valid}
    assert set(terms) == set(expect)
    for name, value in expect.items():
        assert torch.allclose(terms[name], value, rtol=1e-5, atol=1e-6), (name, terms[name], value)
    assert (penalty[:3] > 0).all() and (penalty[3:] == 0).all()


class TiedHead(nn.Module):
    """The embedding and tied head every stand-in denoiser below shares."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(50, 8)
        self.head_bias = nn.Parameter(torch.zeros(50))

    def embed(self, ids):
        return self.embedding(ids)

    def logits(self, x):
        return x @ self.embedding.weight.t() + self.head_bias


class Constant(TiedHead):
    """A denoiser that ignores its input: both passes predict the same thing."""

    def __init__(self):
        super().__init__()
        self.out = nn.Parameter(torch.randn(8))

    def forward(self, z, t):
        return self.out.expand_as(z)


def test_penalty_is_zero_for_identical_predictions():
    ids, mask, t = batch()
    terms = diffusion_loss(Constant(), ids, mask, t, AB, dp_weight=1.0, window=WINDOW)
    assert torch.all(terms["penalty"] == 0)


class Linear(TiedHead):
    """f(z, t) = w·z + b·t/T, recording the gradient reaching each forward pass's output."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.7))
        self.b = nn.Parameter(torch.tensor(0.3))
        self.output_grads = []

    def forward(self, z, t):
        out = self.w * z + self.b * (t.float() / 2000).view(-1, 1, 1)
        out.register_hook(lambda g: self.output_grads.append(g.detach().clone()))
        return out


@pytest.mark.parametrize("partner", ["forward", "reverse"])
def test_penalty_gradient_reaches_both_passes(partner):
    model = Linear()
    ids, mask, t = batch()
    torch.manual_seed(0)
    terms = diffusion_loss(model, ids, mask, torch.tensor([300, 500, 700, 900]), AB, dp_weight=1.0, window=WINDOW, dp_partner=partner)
    assert terms["partner_valid"].all()
    terms["penalty"].sum().backward()
    grads = torch.cat([g.flatten(1) for g in model.output_grads]) if partner == "reverse" else model.output_grads[0].flatten(1)
    first, second = grads.chunk(2)  # rows of f(z_t, t) and of f(z_t′, t′)
    assert first.abs().sum(1).gt(0).all() and second.abs().sum(1).gt(0).all()
    assert model.w.grad.abs() > 0 and model.b.grad.abs() > 0


def test_partner_timesteps_stay_in_the_window_and_mask_empty_sides():
    upper, lower = WINDOW
    t = torch.randint(0, 2000, (20000,), generator=torch.Generator().manual_seed(0))
    t2, valid = partner_timesteps(t, upper, lower, generator=torch.Generator().manual_seed(1))
    assert torch.all((t2 >= lower[t]) & (t2 <= upper[t]))
    assert torch.all(t2[valid] != t[valid]) and torch.all(t2[~valid] == t[~valid])
    assert 0.45 < (t2 > t).float().mean() < 0.55  # the up side half the time (rarely empty)
    edge = torch.tensor([1999] * 2000 + [0] * 2000)
    e2, ev = partner_timesteps(edge, upper, lower, generator=torch.Generator().manual_seed(2))
    assert torch.all(e2[~ev] == edge[~ev]) and 0.4 < (~ev).float().mean() < 0.6  # one side empty at each end
    assert torch.all(e2[:2000][ev[:2000]] < 1999) and torch.all(e2[2000:][ev[2000:]] > 0)


def two_pointer_partner_maps(sig: list[float], delta: float) -> tuple[dict[int, int], dict[int, int]]:
    """The reference code's partner maps, as its two-pointer walk over the σ table builds them: the upward map gets an
    entry for t once some s ≤ T−1 lies more than δ above σ_t (the entry: the last s within δ), the downward map once
    some s ≥ 0 lies more than δ below; a t whose window reaches the end of the table gets no entry on that side."""
    up, down = {}, {}
    lp = rp = 0
    while rp < len(sig):
        if sig[rp] - sig[lp] <= delta:
            rp += 1
        else:
            up[lp] = rp - 1
            lp += 1
    lp = rp = len(sig) - 1
    while lp >= 0:
        if sig[rp] - sig[lp] <= delta:
            lp -= 1
        else:
            down[rp] = lp + 1
            rp -= 1
    return up, down


@pytest.mark.parametrize("delta", [0.05, 0.2])
def test_window_ends_diffutext_and_reference(delta):
    ab = alpha_bar_table("sqrt", 2000)
    sig = (1 - ab).sqrt().tolist()
    up, down = two_pointer_partner_maps(sig, delta)
    T = len(sig)
    upper, lower = dp_window(ab, delta)
    ref_upper, ref_lower = dp_window(ab, delta, "reference")
    for t in range(T):
        assert ref_upper[t] == up.get(t, t) and ref_lower[t] == down.get(t, t), t  # reference: no entry = empty side
        assert upper[t] == up.get(t, T - 1) and lower[t] == down.get(t, 0), t  # diffutext: the window runs to the end
    if delta == 0.05:
        no_up = [t for t in range(T - 1) if t not in up]
        assert no_up == list(range(1632, T - 1))  # every t ≥ 1632 has no upward partner in the reference code
        assert [t for t in range(1, T) if t not in down] == [1]  # and t = 1 no downward one (σ_1 − σ_0 ≤ δ)
        t = torch.tensor([1700, 1700])
        t2, valid = partner_timesteps(t, ref_upper, ref_lower, uniforms=(torch.tensor([0.1, 0.9]), torch.tensor([0.5, 0.5])))
        assert valid.tolist() == [False, True] and t2[0] == 1700 and lower[1700] <= t2[1] < 1700
