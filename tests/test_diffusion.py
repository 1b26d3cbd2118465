"""The noise schedule, partial noising and the Distance Penalty window (method.md §1, §3)."""

import math

import pytest
import torch

from diffutext.diffusion import alpha_bar_table, betas, q_sample, sigma
from diffutext.losses import dp_window


def test_sqrt_schedule_formula():
    T = 2000
    f = lambda s: 1 - math.sqrt(s + 1e-4)
    b = betas("sqrt", T)
    for t in (0, 1, 500, 1998):
        assert b[t].item() == pytest.approx(min(1 - f((t + 1) / T) / f(t / T), 0.999), rel=1e-12)
    ab = alpha_bar_table("sqrt", T)
    assert ab[0].item() == pytest.approx(1 - b[0].item(), rel=1e-12)
    assert ab[1000].item() == pytest.approx(torch.prod(1 - b[:1001]).item(), rel=1e-9)
    assert ab[-1].item() < 1e-6 and torch.all(ab[1:] < ab[:-1])


@pytest.mark.parametrize("schedule", ["sqrt", "linear", "cosine"])
def test_every_schedule_is_decreasing_in_0_1(schedule):
    ab = alpha_bar_table(schedule, 500)
    assert ab.shape == (500,) and torch.all(ab > 0) and torch.all(ab < 1) and torch.all(ab[1:] < ab[:-1])


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown schedule"):
        betas("quadratic", 10)


def test_q_sample_noises_only_target_positions():
    ab = alpha_bar_table("sqrt", 2000).float()
    x0 = torch.randn(2, 6, 4)
    eps = torch.randn(2, 6, 4)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    t = torch.tensor([1000, 10])
    z = q_sample(x0, t, ab, eps, mask)
    assert torch.equal(z[~mask], x0[~mask])
    expect = ab[1000].sqrt() * x0[0, 3:] + (1 - ab[1000]).sqrt() * eps[0, 3:]
    assert torch.allclose(z[0, 3:], expect)


@pytest.mark.parametrize("t,lo,hi", [(100, 65, 148), (500, 375, 654), (1000, 785, 1256), (1900, 1547, 1999)])
def test_dp_window_bounds_match_the_paper(t, lo, hi):
    upper, lower = dp_window(alpha_bar_table("sqrt", 2000), 0.05)
    assert (lower[t].item(), upper[t].item()) == (lo, hi)


def test_dp_window_definition_holds_everywhere():
    ab = alpha_bar_table("sqrt", 2000)
    s = sigma(ab)
    upper, lower = dp_window(ab, 0.05)
    for t in range(0, 2000, 37):
        u, d = upper[t].item(), lower[t].item()
        assert s[u] - s[t] <= 0.05 and (u == 1999 or s[u + 1] - s[t] > 0.05)
        assert s[t] - s[d] <= 0.05 and (d == 0 or s[t] - s[d - 1] > 0.05)
