"""The loss, model and sampling options beyond the paper (method.md §7): each formula pinned against a
hand computation, each one shown to change the result when switched on (so a test fails if it is off)."""

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffutext.config import ModelConfig, resolve
from diffutext.data.batches import choose_seq_len, pack_one
from diffutext.diffusion import alpha_bar_table, q_sample, sigma
from diffutext.losses import LossOptions, diffusion_loss, dp_window, draw_noise, forward_noise
from diffutext.model import Denoiser
from diffutext.samplers import denoise, make_sampler
from diffutext.timesteps import ClippedTimesteps, clip_timestep, nearest_neighbour_var
from diffutext.train import train
from helpers import invoke

AB = alpha_bar_table("sqrt", 2000).float()
WINDOW = dp_window(alpha_bar_table("sqrt", 2000), 0.05)


def tiny_model(seed=0, **options):
    torch.manual_seed(seed)
    return Denoiser(
        ModelConfig(vocab_size=50, hidden_dim=8, width=16, layers=1, heads=2, ffn=32, dropout=0.0, seq_len=12, time_dim=8, **options)
    )


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (4, 12), generator=g)
    mask = torch.zeros(4, 12, dtype=torch.bool)
    mask[0, 4:] = mask[1, 6:] = mask[2, 9:] = mask[3, 2:] = True  # a different source length per example
    t = torch.tensor([0, 100, 1000, 1999])
    return ids, mask, t


def noise_for(ids, partner=False, seed=5, **draws):
    return draw_noise((*ids.shape, 8), partner, torch.Generator().manual_seed(seed), **draws)


def by_hand(model, ids, mask, t, noise, factor=1.0, prev=None):
    """x0 = E(w), z0, z_t and x0_hat = f(z_t, t) written out from method.md §1 with the given draws."""
    x0 = model.embed(ids)
    z0 = x0 + sigma(AB[:1]) * noise.eps0
    z_t = q_sample(z0, t, AB, factor * noise.eps, mask)
    x0_hat = model(z_t, t) if prev is None else model(z_t, t, prev)
    return x0, z0, z_t, x0_hat


def masked_mean(x, mask):  # (B, L) over the target positions
    return (x * mask).sum(1) / mask.sum(1)


# ---- loss over target positions only ----


def test_target_positions_average_every_term_over_the_target_only():
    model, (ids, mask, t) = tiny_model(), batch()
    noise = noise_for(ids)
    terms = diffusion_loss(model, ids, mask, t, AB, noise=noise, options=LossOptions(positions="target"))
    x0, z0, z_t, x0_hat = by_hand(model, ids, mask, t, noise)
    w = mask.float()
    mse = masked_mean(((x0 - x0_hat) ** 2).mean(-1), w)
    nll = masked_mean(F.cross_entropy(model.logits(z0).transpose(1, 2), ids, reduction="none"), w)
    tT = masked_mean(((AB[-1].sqrt() * z0) ** 2).mean(-1), w)
    assert torch.allclose(terms["mse"], mse, rtol=1e-5) and torch.allclose(terms["decoder_nll"], nll, rtol=1e-5)
    assert torch.allclose(terms["tT"], tT, rtol=1e-5) and torch.allclose(terms["loss"], mse + nll + tT, rtol=1e-5)
    every = diffusion_loss(model, ids, mask, t, AB, noise=noise)  # "all": the DiffuSeq mean over every position
    assert not torch.allclose(every["mse"], terms["mse"])
    assert torch.allclose(every["mse"], ((x0 - x0_hat) ** 2).mean((1, 2)), rtol=1e-5)


def test_target_positions_ignore_what_the_model_predicts_on_the_source():
    model, (ids, mask, t) = tiny_model(), batch()
    noise = noise_for(ids)
    a = diffusion_loss(model, ids, mask, t, AB, noise=noise, options=LossOptions(positions="target"))
    with torch.no_grad():  # a different down-projection bias moves every prediction; only the source rows are compared
        model.down[2].bias.add_(1.0)
    b = diffusion_loss(model, ids, mask, t, AB, noise=noise, options=LossOptions(positions="target"))
    assert not torch.allclose(a["mse"], b["mse"])  # sanity: the target predictions moved too
    # the source-row error never enters: zeroing it by hand changes nothing
    x0, z0, z_t, x0_hat = by_hand(model, ids, mask, t, noise)
    err = ((x0 - x0_hat) ** 2).mean(-1) * mask
    assert torch.allclose(b["mse"], err.sum(1) / mask.sum(1), rtol=1e-5)


# ---- anchor loss ----


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_anchor_loss_is_the_head_cross_entropy_on_x0_hat_at_target_positions(smoothing):
    model, (ids, mask, t) = tiny_model(), batch()
    noise = noise_for(ids)
    options = LossOptions(anchor_weight=0.5, anchor_smoothing=smoothing)
    terms = diffusion_loss(model, ids, mask, t, AB, noise=noise, options=options)
    x0, z0, z_t, x0_hat = by_hand(model, ids, mask, t, noise)
    ce = F.cross_entropy(model.logits(x0_hat).transpose(1, 2), ids, reduction="none", label_smoothing=smoothing)
    anchor = masked_mean(ce, mask.float())
    base = diffusion_loss(model, ids, mask, t, AB, noise=noise)
    assert torch.allclose(terms["anchor"], anchor, rtol=1e-5, atol=1e-6)
    assert torch.allclose(terms["loss"], base["loss"] + 0.5 * anchor, rtol=1e-5)
    assert "anchor" not in base


def test_anchor_loss_gradient_matches_autograd_of_the_plain_cross_entropy():
    ids, mask, t = batch()
    noise = noise_for(ids)
    grads = []
    for fast in (True, False):
        model = tiny_model()
        if fast:
            loss = diffusion_loss(model, ids, mask, t, AB, noise=noise, options=LossOptions(anchor_weight=1.0, anchor_smoothing=0.1))[
                "anchor"
            ].mean()
        else:
            x0_hat = by_hand(model, ids, mask, t, noise)[3]
            ce = F.cross_entropy(model.logits(x0_hat).transpose(1, 2), ids, reduction="none", label_smoothing=0.1)
            loss = masked_mean(ce, mask.float()).mean()
        loss.backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], atol=1e-5), k


# ---- self-conditioning ----


class Recorder(nn.Module):
    """Wraps a denoiser and records every call's inputs."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []
        self.embedding, self.head_bias, self.config = inner.embedding, inner.head_bias, inner.config

    def embed(self, ids):
        return self.inner.embed(ids)

    def logits(self, x):
        return self.inner.logits(x)

    def forward(self, z, t, prev=None):
        self.calls.append((z.detach().clone(), t.clone(), None if prev is None else prev.detach().clone(), torch.is_grad_enabled()))
        return self.inner(z, t, prev)


def test_self_conditioning_widens_the_input_and_zeros_mean_no_previous_estimate():
    plain, sc = tiny_model(), tiny_model(self_condition=0.5)
    assert plain.up[0].in_features == 8 and sc.up[0].in_features == 16
    z, t = torch.randn(2, 12, 8), torch.tensor([3, 700])
    assert torch.equal(sc(z, t), sc(z, t, torch.zeros_like(z)))
    assert not torch.allclose(sc(z, t), sc(z, t, torch.randn_like(z)))


def test_self_conditioning_feeds_the_detached_first_pass_to_the_selected_rows():
    model, (ids, mask, t) = tiny_model(self_condition=0.5), batch()
    noise = noise_for(ids, self_condition=True)
    noise.self_cond = torch.tensor([0.1, 0.9, 0.4, 0.6])  # rows 0 and 2 self-condition (below 0.5)
    rec = Recorder(model)
    terms = diffusion_loss(rec, ids, mask, t, AB, noise=noise)
    (z1, t1, p1, g1), (z2, t2, p2, g2) = rec.calls
    assert not g1 and g2  # the first pass records no gradient
    assert torch.equal(t1, t[[0, 2]]) and p1 is None  # only the selected rows, fed zeros
    first = model(z1, t1).detach()
    assert torch.allclose(p2[[0, 2]], first, atol=1e-6) and torch.equal(p2[[1, 3]], torch.zeros_like(p2[[1, 3]]))
    x0 = model.embed(ids)
    assert torch.allclose(terms["mse"], ((x0 - model(z2, t2, p2)) ** 2).mean((1, 2)), rtol=1e-5)
    off = Recorder(model)  # probability 0 of the selected rows: one pass, zeros
    noise.self_cond = torch.ones(4)
    diffusion_loss(off, ids, mask, t, AB, noise=noise)
    assert len(off.calls) == 1 and torch.equal(off.calls[0][2], torch.zeros_like(z2))


@pytest.mark.parametrize("partner", ["forward", "reverse"])
def test_self_conditioning_gives_the_distance_penalty_partner_the_same_treatment(partner):
    model, (ids, mask, t) = tiny_model(self_condition=1.0), batch()
    noise = noise_for(ids, partner=True, self_condition=True)
    rec = Recorder(model)
    terms = diffusion_loss(rec, ids, mask, t, AB, dp_weight=2.0, window=WINDOW, dp_partner=partner, noise=noise)
    trained = [c for c in rec.calls if c[3]]
    assert all(c[2] is not None and c[2].abs().sum() > 0 for c in trained)  # every trained pass reads a first-pass x0_hat
    assert sum(c[0].shape[0] for c in rec.calls if not c[3]) == 8  # first passes over both the 4 examples and their partners
    assert torch.isfinite(terms["loss"]).all()


class Snap(nn.Module):
    """A self-conditioned closed-form denoiser that records what it is fed: x0_hat = tanh(z)/2 + prev/4."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(7, 3)
        with torch.no_grad():
            self.embedding.weight.copy_(torch.linspace(-1.5, 1.5, 21).view(7, 3))
        self.config = ModelConfig(vocab_size=7, hidden_dim=3, self_condition=0.5)
        self.fed, self.out = [], []

    def embed(self, ids):
        return self.embedding(ids)

    def logits(self, x):
        return x @ self.embedding.weight.t()

    def forward(self, z, t, prev=None):
        self.fed.append(prev.clone())
        out = torch.tanh(z) / 2 + prev / 4
        self.out.append(out.clone())
        return out


@pytest.mark.parametrize("which", ["clamped", "raw"])
def test_samplers_feed_the_previous_steps_x0_hat(which):
    model = Snap()
    ids = torch.tensor([[0, 1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    denoise(
        model, AB, make_sampler("ads"), 5, ids, mask, clamp=True, generator=torch.Generator().manual_seed(0), self_condition_input=which
    )
    assert len(model.fed) == 5 and torch.equal(model.fed[0], torch.zeros_like(model.fed[0]))
    w = model.embedding.weight.detach()
    for i in range(1, 5):
        prev, out = model.fed[i], model.out[i - 1]
        target = prev[0, 2:]
        if which == "raw":  # the model's own output, before snapping
            assert torch.allclose(target, out[0, 2:])
        else:  # snapped to the nearest word embedding
            nearest = w[torch.cdist(out[0, 2:], w).argmin(-1)]
            assert torch.allclose(target, nearest) and not torch.allclose(target, out[0, 2:])


def test_clamping_by_the_head_snaps_to_the_embedding_of_the_heads_argmax():
    model = Snap()
    ids = torch.tensor([[0, 1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    denoise(model, AB, make_sampler("ads"), 5, ids, mask, clamp=True, generator=torch.Generator().manual_seed(0), clamp_by="head")
    w = model.embedding.weight.detach()
    differs = 0
    for i in range(1, 5):
        out = model.out[i - 1][0, 2:]
        assert torch.allclose(model.fed[i][0, 2:], w[(out @ w.t()).argmax(-1)])
        differs += int(((out @ w.t()).argmax(-1) != torch.cdist(out, w).argmin(-1)).sum())
    assert differs > 0  # the two rules pick different words here, so the test tells them apart


def test_auto_clamping_follows_the_anchor_loss():
    from diffutext.evaluate import resolve_clamp_by

    assert resolve_clamp_by("auto", resolve("tiny")) == "nearest"
    assert resolve_clamp_by("auto", resolve("tiny", {"train": {"anchor_weight": 0.5}})) == "head"
    assert (
        resolve_clamp_by("head", resolve("tiny")) == "head"
        and resolve_clamp_by("nearest", resolve("tiny", {"train": {"anchor_weight": 1.0}})) == "nearest"
    )


# ---- a sequence length that follows the data ----


class Vocab:
    cls, sep, pad = 1, 2, 0

    def encode(self, texts):
        return [[5] * len(s.split()) for s in texts]


def test_seq_len_zero_holds_every_pair_and_decodes_every_source_whole():
    data = {"src": ["a b c", "a b c d e f g h i j", "a"], "trg": ["x y", "x", "x y z w v u t s r q p o n m l k"]}
    import datasets

    L = choose_seq_len(datasets.Dataset.from_dict(data), Vocab())
    # longest pair: 1 + 16 + 3 = 20; longest source decoded whole: 2·10 + 3 = 23; rounded up to a multiple of 8
    assert L == 24
    vocab = Vocab()
    for s, t in zip(data["src"], data["trg"]):
        assert not pack_one(vocab.encode([s])[0], vocab.encode([t])[0], L, vocab)[2]
        assert not pack_one(vocab.encode([s])[0], None, L, vocab)[2]
    assert pack_one(vocab.encode([data["src"][1]])[0], None, 16, vocab)[2]  # a fixed 16 would cut it


def test_training_with_seq_len_zero_stores_the_chosen_length_and_cuts_nothing(tmp_path):
    events = []
    cfg = resolve("tiny", {"model": {"seq_len": 0}, "train": {"max_steps": 2, "eval_every": 0}})
    train(cfg, tmp_path / "run", device="cpu", callback=lambda e, info: events.append((e, info)))
    start = dict(events)["start"]
    stored = json.loads((tmp_path / "run" / "config.json").read_text())
    seq_len = stored["model"]["seq_len"]
    assert seq_len % 8 == 0 and seq_len > 48 and start["truncated"] == 0


# ---- Difformer's noise factor ----


def test_noise_factor_scales_the_training_noise_only():
    model, (ids, mask, t) = tiny_model(), batch()
    noise = noise_for(ids)
    rec = Recorder(model)
    diffusion_loss(rec, ids, mask, t, AB, noise=noise, options=LossOptions(noise_factor=4.0))
    x0, z0, z_t, _ = by_hand(model, ids, mask, t, noise, factor=4.0)
    assert torch.allclose(rec.calls[0][0], z_t, atol=1e-6)
    assert torch.equal(forward_noise(z0, t, AB, noise.eps, mask, 4.0), q_sample(z0, t, AB, 4.0 * noise.eps, mask))
    assert not torch.allclose(forward_noise(z0, t, AB, noise.eps, mask, 4.0), forward_noise(z0, t, AB, noise.eps, mask))


# ---- DiNoiSer's clipped minimum noise ----


def test_nearest_neighbour_variance_and_the_clip_follow_dinoisers_formula():
    w = torch.tensor([[0.0, 0.0], [3.0, 0.0], [3.0, 4.0], [10.0, 10.0]])
    # nearest squared distances: 9, 9, 16, 49+36=85 -> mean 29.75, per dimension 14.875
    assert torch.allclose(nearest_neighbour_var(w, block=3), torch.tensor(14.875))
    var = 0.3
    t_min = clip_timestep(var, AB)
    s = sigma(AB.double())
    clip = (var / (1 + var)) ** 0.5  # DiNoiSer: sqrt(1 / (1/var + 1))
    assert s[t_min] >= clip - 1e-6 and s[t_min - 1] < clip
    assert clip_timestep(var, AB, noise_factor=4.0) < t_min  # more noise per step: the clip comes earlier


def test_clipped_timesteps_never_train_below_the_clip_and_move_with_the_embeddings():
    emb = nn.Embedding(40, 8)
    with torch.no_grad():
        emb.weight.mul_(0.2)
    sampler = ClippedTimesteps(2000, torch.device("cpu"), AB, lambda: emb.weight, every=1)
    t, weights = sampler.sample(4096, torch.Generator().manual_seed(0))
    low = sampler.t_min
    assert weights is None and low > 0 and int(t.min()) >= low and int(t.max()) == 1999
    assert int(t.min()) < low + 20  # the whole clipped range is used
    with torch.no_grad():
        emb.weight.mul_(5.0)  # spread the words: the clip rises
    sampler.sample(8, torch.Generator().manual_seed(0))
    assert sampler.t_min > low


# ---- DiffuSeq-v2's soft absorbing state ----


def test_absorbing_forward_process_runs_around_m_and_replaces_tokens_by_m():
    model, (ids, mask, t) = tiny_model(absorbing=0.5), batch()
    m = model.mask_state
    assert m.shape == (8,)
    z0, eps = torch.randn(4, 12, 8), torch.randn(4, 12, 8)
    never = torch.ones(4, 12)  # uniform 1: never absorbed
    z = forward_noise(z0, t, AB, eps, mask, mask_state=m, rate=0.5, absorb=never)
    ab = AB[t].view(-1, 1, 1)
    expect = torch.where(mask.unsqueeze(-1), ab.sqrt() * (z0 - m) + (1 - ab).sqrt() * eps + m, z0)
    assert torch.allclose(z, expect, atol=1e-6)
    u = torch.rand(4, 12, generator=torch.Generator().manual_seed(3))
    z = forward_noise(z0, t, AB, eps, mask, mask_state=m, rate=0.5, absorb=u)
    hit = (u < 0.5 * (1 - AB[t]).sqrt()[:, None]) & mask
    assert hit.any() and torch.allclose(z[hit], m.expand(int(hit.sum()), 8))
    assert torch.allclose(z[~hit], expect[~hit], atol=1e-6)
    noise = noise_for(ids, absorbing=True)
    terms = diffusion_loss(model, ids, mask, t, AB, noise=noise)
    terms["loss"].mean().backward()
    assert model.mask_state.grad is not None and model.mask_state.grad.abs().sum() > 0


class Const(nn.Module):
    """An absorbing-state model that always predicts x0_hat = m + c."""

    def __init__(self, c):
        super().__init__()
        self.embedding = nn.Embedding(7, 3)
        self.mask_state = nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))
        self.c, self.inputs = c, []

    def embed(self, ids):
        return self.embedding(ids)

    def forward(self, z, t):
        self.inputs.append(z.clone())
        return (self.mask_state + self.c).expand_as(z)


def test_sampling_starts_from_noise_plus_m_and_updates_around_m():
    c = torch.tensor([0.1, 0.2, -0.3])
    model = Const(c)
    ids = torch.tensor([[0, 1, 2, 3, 4, 5]] * 64)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]] * 64, dtype=torch.bool)
    z = denoise(model, AB, make_sampler("ads"), 5, ids, mask, clamp=False, generator=torch.Generator().manual_seed(0))
    start = model.inputs[0][mask]  # (rows, 3): ε + m
    assert torch.allclose(start.mean(0), model.mask_state.detach(), atol=0.15)
    assert torch.allclose((start - model.mask_state).std(0), torch.ones(3), atol=0.15)
    assert torch.allclose(z[mask], (model.mask_state + c).expand(int(mask.sum()), 3), atol=1e-5)  # last step: x0_hat


# ---- the Distance Penalty for the last part of the budget ----


def test_dp_from_turns_the_penalty_on_for_the_last_part_only(tmp_path):
    cfg = resolve("tiny", {"train": {"max_steps": 8, "distance_penalty": 2.0, "dp_from": 0.5, "log_every": 1, "eval_every": 0}})
    train(cfg, tmp_path / "run", device="cpu")
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    with_dp = [r["step"] for r in log if "penalty" in r]
    assert with_dp == [5, 6, 7, 8]  # progress = step/max_steps ≥ 0.5 from the 5th step on


def test_options_off_draw_exactly_the_base_noise():
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    a = draw_noise((2, 5, 3), True, g1)
    b = draw_noise((2, 5, 3), True, g2, self_condition=True, absorbing=True)
    assert all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("eps0", "eps", "side", "offset", "eps2"))
    assert a.self_cond is None and b.self_cond.shape == (2,) and b.absorb.shape == (2, 5) and b.absorb2.shape == (2, 5)


# ---- segment positions ----


def test_segment_positions_count_each_side_from_its_start():
    model = tiny_model(positions="segment")
    mask = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    pos = model.positional(12, mask)
    P, S = model.position.weight, model.segment.weight
    assert torch.allclose(pos[0, 1], P[1] + S[0]) and torch.allclose(pos[0, 4], P[1] + S[1])  # first target token ↔ first source token
    assert torch.allclose(pos[1, 9], P[3] + S[1]) and torch.allclose(pos[1, 6], P[6] + S[0])
    absolute = tiny_model()
    assert torch.equal(absolute.positional(12, mask), absolute.position.weight[:12])
    z, t = torch.randn(2, 12, 8), torch.tensor([5, 900])
    assert not torch.allclose(model(z, t, target_mask=mask), model(z, t, target_mask=mask.flip(0)))
    with pytest.raises(ValueError):
        model(z, t)


def test_segment_positions_reach_the_model_in_training_and_sampling():
    model, (ids, mask, t) = tiny_model(positions="segment", self_condition=1.0), batch()
    rec = Recorder(model)
    seen = []
    rec.forward = lambda z, t, prev=None, target_mask=None: (seen.append(target_mask), model(z, t, prev, target_mask))[1]
    terms = diffusion_loss(rec, ids, mask, t, AB, dp_weight=1.0, window=WINDOW, noise=noise_for(ids, True, self_condition=True))
    assert torch.isfinite(terms["loss"]).all() and len(seen) == 2 and all(m is not None for m in seen)
    seen.clear()
    denoise(rec, AB, make_sampler("ads"), 5, ids, mask, generator=torch.Generator().manual_seed(0))
    assert len(seen) == 5 and all(torch.equal(m, mask) for m in seen)


def test_the_retired_softmax_x0_says_what_replaced_it():
    """x0_from softmax (the tied head's softmax over the regressed output) screened level with regression and the
    classifier subsumes it: a run folder that names it is refused with one line saying so."""
    from diffutext.config import ConfigError, RunConfig

    with pytest.raises(ConfigError, match="retired: the classifier"):
        RunConfig.from_dict({"model": {"x0_from": "softmax"}})
    with pytest.raises(ConfigError, match="already its loss"):
        resolve("tiny", {"model": {"x0_from": "classifier"}, "train": {"anchor_weight": 1.0}})


def test_copy_prior_adds_the_aligned_source_input_to_the_networks_output():
    """copy_source: x0_hat = f(z_t, t) + z at the aligned position (target token k <- source token k, the
    source's [SEP] once the source has ended; source positions their own input)."""
    model = tiny_model(copy_source="on").eval()
    with torch.no_grad():
        model.down[2].weight.normal_()  # a trained network's output is not 0
    mask = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    z, t = torch.randn(2, 12, 8), torch.tensor([5, 900])
    # row 0: [CLS] s1 s2 [SEP] | target 4..11 -> s1 s2 then [SEP] (index 3); row 1: [CLS] s1..s5 [SEP] | 7..11 -> s1..s5
    aligned = torch.tensor([[0, 1, 2, 3, 1, 2, 3, 3, 3, 3, 3, 3], [0, 1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 5]])
    expected_copy = torch.stack([z[b, aligned[b]] for b in range(2)])
    assert torch.equal(Denoiser.copied_source(z, mask), expected_copy)
    plain = tiny_model().eval()
    plain.load_state_dict(model.state_dict())
    assert torch.allclose(model(z, t, target_mask=mask), plain(z, t) + expected_copy, atol=1e-6)
    with pytest.raises(ValueError):
        model(z, t)


def test_copy_prior_with_a_silent_network_decodes_the_source():
    """The untrained copy-prior model (its last projection starts at 0) writes the source again."""
    model = tiny_model(copy_source="on").eval()
    assert not model.down[2].weight.any() and not model.down[2].bias.any()
    ids = torch.tensor([[1, 7, 8, 9, 2, 0, 0, 0, 0, 0, 0, 0]])  # [CLS] 7 8 9 [SEP] | seven target slots
    mask = (torch.arange(12) >= 5)[None]
    w = model.embedding.weight.detach()

    def words(m):
        z = denoise(m, AB, make_sampler("ads"), 5, ids, mask, clamp=True, generator=torch.Generator().manual_seed(0))
        return torch.cdist(z[0, 5:], w).argmin(-1).tolist()

    assert words(model) == [7, 8, 9, 2, 2, 2, 2]
    off = tiny_model().eval()
    off.load_state_dict(model.state_dict())
    assert words(off)[:3] != [7, 8, 9]


def test_copied_input_feeds_the_aligned_source_beside_z_t():
    """copy_input: the up-projection reads [z_t, copied source] (after the self-conditioning input when both are on),
    so target position k sees source token k; with copy_input alone x0_hat is the network's output (no prior added)."""
    mask = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    z, t = torch.randn(1, 12, 8), torch.tensor([700])
    for options, width in (({"copy_input": True}, 16), ({"copy_input": True, "self_condition": 0.5}, 24)):
        model = tiny_model(**options).eval()
        assert model.up[0].in_features == width
        seen = []
        model.up[0].register_forward_hook(lambda mod, args, out, _seen=seen: _seen.append(args[0]))
        x0_prev = torch.randn(1, 12, 8)
        with torch.no_grad():
            model(z, t, x0_prev=x0_prev, target_mask=mask)
        assert torch.equal(seen[0][..., :8], z)
        assert torch.equal(seen[0][..., -8:], Denoiser.copied_source(z, mask))
        if "self_condition" in options:
            assert torch.equal(seen[0][..., 8:16], x0_prev)
    model = tiny_model(copy_input=True).eval()
    other = z.clone()
    other[0, 2] += 1.0  # source token 2 changes; with attention cut off only its aligned target position (5) can see it
    with torch.no_grad():
        for block in model.blocks:
            block.proj.weight.zero_(), block.proj.bias.zero_()
        diff = (model(z, t, target_mask=mask) - model(other, t, target_mask=mask)).abs().sum(-1)[0]
    assert diff[5] > 0 and diff[2] > 0 and not diff[[4, 6, 7, 8]].any()
    with pytest.raises(ValueError):
        model(z, t)


# ---- the copy prior's auto setting ----


def test_source_overlap_is_the_token_dice_of_the_packed_pairs():
    """2·|src ∩ trg| / (|src| + |trg|) with multiset intersections per pair, specials left out."""
    from diffutext.data.batches import CompactIds, Packed, source_overlap

    class V:  # the special ids of a vocabulary
        pad, cls, sep = 0, 2, 3

    # pair 1: src 5 5 6, trg 5 6 6 7 -> shared 5, 6 (2 of 7 tokens on each count): 2·2 / 7
    # pair 2: src 8 9, trg 10 -> nothing shared: 0 / 3
    rows = [[2, 5, 5, 6, 3, 5, 6, 6, 7, 3, 0], [2, 8, 9, 3, 10, 3, 0, 0, 0, 0, 0]]
    first_target = [5, 4]
    ids = torch.tensor(rows)
    mask = torch.arange(11)[None] >= torch.tensor(first_target)[:, None]
    packed = Packed(CompactIds(ids), mask, 0)
    assert source_overlap(packed, V()) == pytest.approx(2 * 2 / (7 + 3))
    assert source_overlap(Packed(CompactIds(ids[1:]), mask[1:], 0), V()) == 0.0
    assert source_overlap(Packed(CompactIds(ids[:1]), mask[:1], 0), V()) == pytest.approx(4 / 7)


def test_copy_source_auto_follows_the_training_pairs_and_is_stored_resolved(tmp_path):
    """auto: on for bible-basic (its sources and targets overlap), off for a set whose targets share no token
    with their sources; the run's config keeps on/off, and the status line says which and why."""
    events = []
    cfg = resolve("tiny", {"model": {"copy_source": "auto"}, "train": {"max_steps": 1, "eval_every": 0}})
    train(cfg, tmp_path / "bible", device="cpu", callback=lambda e, info: events.append((e, info)))
    assert json.loads((tmp_path / "bible" / "config.json").read_text())["model"]["copy_source"] == "on"
    assert any(e == "choice" and "copy prior on (auto)" in i["message"] for e, i in events)
    folder = tmp_path / "unrelated"
    folder.mkdir()
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
    lines = [
        json.dumps({"src": f"{words[i % 3]} {words[(i + 1) % 3]}", "trg": f"{words[3 + i % 3]} {words[3 + (i + 2) % 3]}"})
        for i in range(40)
    ]
    for split in ("train", "valid"):
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    cfg = resolve("tiny", {"model": {"copy_source": "auto"}, "train": {"task": str(folder), "max_steps": 1, "eval_every": 0}})
    train(cfg, tmp_path / "off", device="cpu")
    assert json.loads((tmp_path / "off" / "config.json").read_text())["model"]["copy_source"] == "off"


def test_copy_source_auto_is_never_built_and_old_boolean_configs_still_load():
    from diffutext.config import RunConfig

    with pytest.raises(ValueError, match="resolved"):
        tiny_model(copy_source="auto")
    old = resolve("tiny").to_dict()
    for stored, read in ((True, "on"), (False, "off")):
        old["model"]["copy_source"] = stored
        assert RunConfig.from_dict(old).model.copy_source == read
    assert resolve("small").model.copy_source == "off" and resolve("small").model.copy_input  # the copy feeds the input only


def test_copy_source_auto_says_when_the_model_cannot_take_the_prior():
    """Overlapping pairs but x0 read through the head: off, and the line says why rather than only the overlap."""
    from diffutext.train import resolve_copy_source

    events = []
    cfg = resolve("tiny", {"model": {"copy_source": "auto", "x0_from": "classifier"}})
    out = resolve_copy_source(cfg, 0.6, lambda e, info: events.append(info["message"]))
    assert out.model.copy_source == "off"
    assert events == [
        "copy prior off (auto): the training pairs' token overlap is 0.60 (at least 0.4), "
        "but model.x0_from classifier has no regressed x0_hat to add it to"
    ]
    events.clear()
    assert (
        resolve_copy_source(
            resolve("tiny", {"model": {"copy_source": "auto"}}), 0.6, lambda e, info: events.append(info["message"])
        ).model.copy_source
        == "on"
    )
    assert events == ["copy prior on (auto): the training pairs' token overlap is 0.60 (at least 0.4)"]


def test_encdec_encodes_the_clean_source_once_and_the_decoder_reads_it():
    """arch encdec: the encoder's source rows depend on neither the target side nor t; the target's output reads the
    source; the parameters are the joint network's, and the same weights give another function."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=50, hidden_dim=8, width=16, layers=4, heads=2, ffn=32, dropout=0.0, seq_len=12, time_dim=8)
    model, joint = Denoiser(replace(config, arch="encdec")), Denoiser(config)
    joint.load_state_dict(model.state_dict())  # the same parameters, name for name
    _, mask, _ = batch()
    z, t = torch.randn(4, 12, 8), torch.tensor([3, 50, 700, 1999])
    encoded = []
    hook = model.blocks[1].register_forward_hook(lambda module, args, out: encoded.append(out))  # the last encoder block
    other = torch.where(mask.unsqueeze(-1), torch.randn(4, 12, 8), z)  # the same source, another noisy target
    y = model(z, t, target_mask=mask)
    model(other, t.flip(0), target_mask=mask)
    hook.remove()
    source = Denoiser.sides(mask, None)[1]  # the encoder runs over the source rows alone, (B, Ls)
    assert torch.equal(encoded[0][source], encoded[1][source])
    moved = z.clone()
    moved[:, 1] += 1.0  # the first source token
    assert (model(moved, t, target_mask=mask) - y)[mask].abs().amax() > 1e-4
    assert not torch.allclose(joint(z, t, target_mask=mask), y, atol=1e-4)
    with pytest.raises(ValueError, match="target mask"):
        model(z, t)


def test_encdec_trains_and_samples(tmp_path, small_task):
    run = train(
        resolve("tiny", {"model": {"arch": "encdec"}, "train": {"task": str(small_task), "max_steps": 4}}), tmp_path / "run", device="cpu"
    )
    config = json.loads((run / "config.json").read_text())
    assert config.get("config", config)["model"]["arch"] == "encdec"
    result = invoke("sample", "--checkpoint", run, "--steps", 5, "--limit", 3, "--out", tmp_path / "out.jsonl")
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 3
