"""DiffuSeq's loss terms and the Distance Penalty (PAPER.md §1, §3)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffutext.config import ModelConfig
from diffutext.diffusion import alpha_bar_table, q_sample
from diffutext.losses import diffusion_loss, dp_window, partner_timesteps
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
    # The same computation written out from PAPER.md §1 with the same noise draws.
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


@pytest.mark.parametrize("partner", ["forward", "reverse"])
def test_dp_total_is_the_half_weighted_sum(partner):
    model = tiny_model()
    ids, mask, t = batch()
    torch.manual_seed(3)
    terms = diffusion_loss(model, ids, mask, t, AB, dp_weight=2.0, window=WINDOW, dp_partner=partner)
    expect = 0.5 * (terms["mse"] + terms["mse_partner"] + 2 * terms["decoder_nll"] + 2 * terms["tT"] + 2.0 * terms["penalty"])
    assert torch.allclose(terms["loss"], expect)
    assert torch.all(terms["penalty"][terms["partner_valid"] == 0] == 0)


class Constant(nn.Module):
    """A denoiser that ignores its input: both passes predict the same thing."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(50, 8)
        self.head_bias = nn.Parameter(torch.zeros(50))
        self.out = nn.Parameter(torch.randn(8))

    def embed(self, ids):
        return self.embedding(ids)

    def logits(self, x):
        return x @ self.embedding.weight.t() + self.head_bias

    def forward(self, z, t):
        return self.out.expand_as(z)


def test_penalty_is_zero_for_identical_predictions():
    ids, mask, t = batch()
    terms = diffusion_loss(Constant(), ids, mask, t, AB, dp_weight=1.0, window=WINDOW)
    assert torch.all(terms["penalty"] == 0)


class Linear(nn.Module):
    """f(z, t) = w·z + b·t/T, recording the gradient reaching each forward pass's output."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(50, 8)
        self.head_bias = nn.Parameter(torch.zeros(50))
        self.w = nn.Parameter(torch.tensor(0.7))
        self.b = nn.Parameter(torch.tensor(0.3))
        self.output_grads = []

    def embed(self, ids):
        return self.embedding(ids)

    def logits(self, x):
        return x @ self.embedding.weight.t() + self.head_bias

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
