"""Update rules and the sampling loop, pinned with a closed-form dummy denoiser (PAPER.md §4)."""

import math

import pytest
import torch
from torch import nn

from diffutext.diffusion import alpha_bar_table
from diffutext.samplers import SAMPLERS, ddim_update, ddpm_update, denoise, make_sampler

AB = alpha_bar_table("sqrt", 2000).float()


def test_ddpm_small_equals_ddim_eta_one():
    z = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0))
    x0 = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(1))
    for abar_t, abar_prev in [(0.2, 0.5), (0.01, 0.9), (0.6, 0.61)]:
        a = ddpm_update(z, x0, abar_t, abar_prev, torch.Generator().manual_seed(5), variance="small")
        b = ddim_update(z, x0, abar_t, abar_prev, torch.Generator().manual_seed(5), eta=1.0)
        assert torch.allclose(a, b, atol=1e-5)


def test_last_respaced_step_returns_x0_hat():
    z, x0 = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    assert torch.allclose(ddpm_update(z, x0, 0.98, 1.0), x0, atol=1e-6)
    assert torch.allclose(ddim_update(z, x0, 0.98, 1.0), x0, atol=1e-6)


class Dummy(nn.Module):
    """Closed-form denoiser: x0_hat = tanh(z)·(1 − t/T) / 2 on a fixed 7-word embedding table."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(7, 3)
        with torch.no_grad():
            self.embedding.weight.copy_(torch.linspace(-1.5, 1.5, 21).view(7, 3))

    def embed(self, ids):
        return self.embedding(ids)

    def logits(self, x):
        return x @ self.embedding.weight.t()

    def forward(self, z, t):
        return torch.tanh(z) * (1 - t.float() / 2000).view(-1, 1, 1) / 2


def run(name, steps, clamp=False, **options):
    ids = torch.tensor([[0, 1, 2, 3, 4, 5], [6, 5, 4, 3, 2, 1]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    sampler = make_sampler(name, **options)
    return denoise(Dummy(), AB, sampler, steps, ids, mask, clamp=clamp, generator=torch.Generator().manual_seed(0)), mask


# Sums of the final sample over target positions, fixed by the closed-form dummy and seed 0.
PINNED = {
    ("ddpm", 2000): -0.2282,
    ("uniform", 20): 1.607545,
    ("skip", 20): -3.399071,
    ("ddim", 20): -0.444466,
    ("ads", 20): 2.178908,
    ("ads", 10): 0.890897,
}


@pytest.mark.parametrize("name,steps", sorted(PINNED))
def test_full_loop_matches_pinned_numbers(name, steps):
    z, mask = run(name, steps)
    assert z[mask].sum().item() == pytest.approx(PINNED[(name, steps)], abs=1e-4)
    ids = torch.tensor([[0, 1, 2, 3, 4, 5], [6, 5, 4, 3, 2, 1]])
    src = Dummy().embed(ids)
    assert torch.equal(z[~mask], src[~mask])  # the source is re-imposed


class Recording(Dummy):
    """The dummy, keeping the input of its last call."""

    def forward(self, z, t):
        self.last = (z.clone(), t.clone())
        return super().forward(z, t)


def test_ddim_draws_nothing_after_z_T_and_ends_on_the_prediction():
    """DDIM with η = 0 takes one draw (z_T) from the generator and none after it, and its last respaced
    step (t = 0, ᾱ_prev = 1) returns that step's x0_hat exactly."""
    ids = torch.tensor([[0, 1, 2, 3, 4, 5], [6, 5, 4, 3, 2, 1]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    model, g = Recording(), torch.Generator().manual_seed(0)
    z = denoise(model, AB, make_sampler("ddim"), 20, ids, mask, clamp=False, generator=g)
    last_z, last_t = model.last
    assert last_t.tolist() == [0, 0] and torch.equal(z[mask], Dummy.forward(model, last_z, last_t)[mask])
    one_draw = torch.Generator().manual_seed(0)
    torch.randn((2, 6, 3), generator=one_draw)
    assert torch.equal(g.get_state(), one_draw.get_state())
    ancestral = torch.Generator().manual_seed(0)
    denoise(Dummy(), AB, make_sampler("uniform"), 20, ids, mask, clamp=False, generator=ancestral)
    assert not torch.equal(ancestral.get_state(), one_draw.get_state())  # the ancestral update does draw: the check can tell


def test_clamping_lands_on_word_embeddings():
    z, mask = run("ads", 10, clamp=True)
    table = Dummy().embedding.weight
    d = torch.cdist(z[mask], table).min(-1).values
    assert torch.all(d < 1e-5)


def test_ads_can_run_with_the_ddim_update():
    a, _ = run("ads", 10, update="ddim")
    b, _ = run("ads", 10)
    assert not torch.allclose(a, b)


def test_skip_moves_only_one_timestep_each_step():
    sampler = SAMPLERS["skip"]
    triples = sampler.triples(AB, 20)
    assert [t for t, _, _ in triples] == list(range(1999, 0, -100))
    for t, abar_t, abar_prev in triples:
        assert abar_prev == pytest.approx(AB[t - 1].item(), rel=1e-6)


def test_unknown_options_are_rejected():
    with pytest.raises(ValueError):
        make_sampler("plms")
    with pytest.raises(ValueError):
        make_sampler("ads", update="euler")
    with pytest.raises(ValueError):
        make_sampler("ads", variance="medium")
