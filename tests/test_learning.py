"""The levers of a denoiser that learns (README, "What the network learns"): the classifier with its output prior
(CDCD), embeddings on a sphere, training on the true length with a length head, time warping, the encoder–decoder
run as two sequences with the source encoded once per chain, the copied input's uniform alignment and the
posterior input. Each formula is pinned against a hand computation, and each option is shown to change the
result when switched on, so that a test fails if it is off or wrong."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from diffutext.config import ModelConfig, TrainConfig, resolve
from diffutext.data.batches import held_end
from diffutext.diffusion import alpha_bar_table, q_sample
from diffutext.evaluate import fixed_length, predicted_lengths
from diffutext.losses import classifier_loss, dp_window, draw_noise
from diffutext.model import Block, Denoiser, length_range, mix_copies
from diffutext.samplers import denoise, generate, make_sampler
from diffutext.timesteps import WarpedTimesteps
from helpers import invoke

AB = alpha_bar_table("sqrt", 2000).float()
PAD, CLS, SEP = 0, 1, 2
CLASSIFIER = dict(arch="encdec", x0_from="classifier", embedding_norm=True, target_length="head")


def model_of(seed=0, **options):
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=40, hidden_dim=8, width=16, layers=2, heads=2, ffn=32, dropout=0.0, seq_len=14, time_dim=8, **options)
    return Denoiser(config, AB)


def packed(seed=1):
    """Four packed pairs [CLS] src [SEP] trg [SEP] [PAD]…, sources and targets of different lengths."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((4, 14), PAD)
    mask = torch.zeros(4, 14, dtype=torch.bool)
    for row, (n_src, n_trg) in enumerate([(3, 4), (5, 2), (2, 6), (4, 4)]):
        src, trg = torch.randint(3, 40, (n_src,), generator=g), torch.randint(3, 40, (n_trg,), generator=g)
        seq = torch.cat([torch.tensor([CLS]), src, torch.tensor([SEP]), trg, torch.tensor([SEP])])
        ids[row, : len(seq)] = seq
        mask[row, n_src + 2 :] = True
    return ids, mask, held_end(ids, mask, PAD)


def perturb(model, scale=0.5, seed=3):
    """Random weights everywhere (the zero-initialised readout included), so that every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


# ---- the classifier (CDCD) ----


def test_classifier_logits_are_the_readout_plus_the_output_prior_and_x0_hat_their_expected_embedding():
    model = perturb(model_of(**CLASSIFIER)).eval()
    ids, mask, hold = packed()
    t = torch.tensor([0, 300, 1000, 1999])
    z = torch.randn(4, 14, 8)
    x0_hat, logits = model(z, t, target_mask=mask, hold=hold, with_head=True)
    written = mask & ~hold
    rows = written.reshape(-1).nonzero().squeeze(1)
    # by hand: the blocks' output h at the written rows, read out, plus (√ᾱ/(1 − ᾱ))·z·Êᵀ at each row's own t
    h = model.out_norm(model.encode_decode(model._inputs(z, t, None, mask, None, hold), mask, hold))
    E = model.embedding.weight / model.embedding.weight.norm(dim=1, keepdim=True) * 8**0.5
    coef = (AB[t].sqrt() / (1 - AB[t]))[rows // 14]
    expected = model.readout(h.reshape(-1, 16)[rows]) + coef[:, None] * (z.reshape(-1, 8)[rows] @ E.t())
    assert torch.allclose(logits, expected, atol=1e-4)
    assert torch.allclose(x0_hat.reshape(-1, 8)[rows], torch.softmax(expected, -1) @ E, atol=1e-5)
    assert torch.equal(x0_hat[~written], z[~written])  # the source and the held rows keep their input


def test_the_output_prior_alone_names_the_token_at_low_noise_and_nothing_at_high_noise():
    model = model_of(**CLASSIFIER).eval()  # the readout starts at zero: the logits are the prior's
    ids, mask, hold = packed()
    x0 = model.embed(ids)
    for t, right in ((0, 1.0), (1999, None)):
        z = q_sample(x0, torch.full((4,), t), AB, torch.randn(4, 14, 8, generator=torch.Generator().manual_seed(0)), mask & ~hold)
        _, logits = model(z, torch.full((4,), t), target_mask=mask, hold=hold, with_head=True)
        picked = logits.argmax(-1)
        truth = ids.reshape(-1)[(mask & ~hold).reshape(-1)]
        if right is not None:
            assert (picked == truth).float().mean() == right
        else:
            assert logits.std(-1).max() < 0.05  # ᾱ_1999 ≈ 0: no token is preferred
    off = model_of(**CLASSIFIER, output_prior=False).eval()
    _, logits = off(x0, torch.zeros(4, dtype=torch.long), target_mask=mask, hold=hold, with_head=True)
    assert torch.equal(logits, torch.zeros_like(logits))  # without the prior the zero readout knows nothing


def test_the_classifier_trains_the_cross_entropy_of_its_logits_alone():
    model = perturb(model_of(**CLASSIFIER))
    ids, mask, hold = packed()
    t = torch.tensor([5, 600, 1200, 1900])
    noise = draw_noise((4, 14, 8), False, torch.Generator().manual_seed(7))
    terms = classifier_loss(model, ids, mask, t, AB, noise=noise, hold=hold)
    assert set(terms) == {"loss", "ce", "length"}
    written = mask & ~hold
    z_t = q_sample(model.embed(ids), t, AB, noise.eps, written)
    _, logits = model(z_t, t, target_mask=mask, hold=hold, with_head=True)
    ce = F.cross_entropy(logits, ids.reshape(-1)[written.reshape(-1)], reduction="none")
    per_example = torch.stack([c.mean() for c in ce.split(written.sum(1).tolist())])
    assert torch.allclose(terms["ce"], per_example, atol=1e-5)
    assert torch.allclose(terms["loss"], terms["ce"] + 0.1 * terms["length"], atol=1e-6)
    terms["loss"].mean().backward()
    assert model.embedding.weight.grad.abs().sum() > 0  # the embedding learns through the cross-entropy alone


def test_the_distance_penalty_on_a_classifier_halves_both_passes_and_pulls_their_x0_hat_together():
    model = perturb(model_of(**CLASSIFIER))
    ids, mask, hold = packed()
    t = torch.tensor([100, 500, 1000, 1500])
    window = dp_window(alpha_bar_table("sqrt", 2000), 0.05)
    noise = draw_noise((4, 14, 8), True, torch.Generator().manual_seed(7))
    terms = classifier_loss(model, ids, mask, t, AB, dp_weight=2.0, window=window, noise=noise, hold=hold)
    expected = 0.5 * (terms["ce"] + terms["ce_partner"] + 2.0 * terms["penalty"]) + 0.1 * terms["length"]
    assert torch.allclose(terms["loss"], expected, atol=1e-6)
    assert (terms["penalty"] > 0).all() and terms["partner_valid"].all()
    base = classifier_loss(model, ids, mask, t, AB, noise=noise, hold=hold)
    assert torch.allclose(base["ce"], terms["ce"], atol=1e-5)  # the first pass is the base loss's own


# ---- embeddings on a sphere ----


def test_embedding_norm_holds_every_row_at_norm_sqrt_d_and_embed_reads_those_rows():
    model = model_of(**CLASSIFIER)
    with torch.no_grad():
        model.embedding.weight.mul_(torch.rand(40, 1) * 5)  # whatever the parameter becomes
    norms = model.table().norm(dim=1)
    assert torch.allclose(norms, torch.full((40,), 8**0.5), atol=1e-5)
    ids = torch.tensor([[3, 7, 9]])
    assert torch.equal(model.embed(ids), model.table()[ids])
    free = model_of(arch="encdec")
    assert torch.equal(free.table(), free.embedding.weight)


# ---- the true length and its head ----


def test_held_end_is_the_targets_sep_and_its_padding_and_only_that_sep_stays_a_key():
    ids, mask, hold = packed()
    for row in range(4):
        sep = int((ids[row] != PAD).nonzero().max())
        assert hold[row].nonzero().squeeze(1).tolist() == list(range(sep, 14))
    keys = Denoiser.keys(mask, hold)[:, 0, 0]
    assert torch.equal(keys, ids != PAD)  # every real token and [SEP] is read, no padding


def test_the_length_head_learns_the_target_length_minus_the_source_length():
    model = perturb(model_of(**CLASSIFIER))
    ids, mask, hold = packed()
    memory = model.encode(model.embed(ids), mask, ids)
    logits = model.length_logits(memory, mask)
    K = length_range(model.config)
    assert logits.shape == (4, 2 * K + 1)
    offsets = torch.tensor([4 - 3, 2 - 5, 6 - 2, 4 - 4])
    terms = classifier_loss(model, ids, mask, torch.tensor([0, 1, 2, 3]), AB, hold=hold)
    assert torch.allclose(terms["length"], F.cross_entropy(logits, offsets + K, reduction="none"), atol=1e-5)


def test_a_predicted_length_places_the_sep_and_holds_it_and_the_padding():
    ids = torch.full((2, 10), PAD)
    ids[0, :4] = torch.tensor([CLS, 5, 6, SEP])
    ids[1, :3] = torch.tensor([CLS, 5, SEP])
    mask = ids == PAD
    hold = fixed_length(ids, mask, SEP, torch.tensor([3, 50]))  # the second too long for its room: cut
    assert ids[0].tolist() == [CLS, 5, 6, SEP, PAD, PAD, PAD, SEP, PAD, PAD]
    assert hold[0].tolist() == [False] * 7 + [True] * 3
    assert ids[1, 9] == SEP and hold[1].tolist() == [False] * 9 + [True]
    model = perturb(model_of(**CLASSIFIER))
    ids, mask, _ = packed()
    src = torch.where(mask, PAD, ids)
    lengths = predicted_lengths(model, src, mask)
    memory = model.encode(model.embed(src), mask, src)
    expected = (~mask).sum(1) - 2 + model.length_logits(memory, mask).argmax(-1) - length_range(model.config)
    assert torch.equal(lengths, expected)


def test_padding_out_of_attention_changes_nothing_the_written_rows_see():
    model = perturb(model_of(**CLASSIFIER)).eval()
    ids, mask, hold = packed()
    z = torch.randn(4, 14, 8)
    t = torch.tensor([10, 20, 30, 40])
    x0_hat = model(z, t, target_mask=mask, hold=hold)
    z2 = torch.where(hold[..., None] & (ids == PAD)[..., None], torch.randn(4, 14, 8) * 9, z)
    written = mask & ~hold
    assert torch.allclose(model(z2, t, target_mask=mask, hold=hold)[written], x0_hat[written], atol=1e-5)


# ---- the encoder–decoder as two sequences ----


def test_a_decoder_block_reads_the_memory_and_itself_in_one_softmax():
    torch.manual_seed(0)
    block = Block(16, 2, 32, 0.0).eval()
    memory, x = torch.randn(2, 3, 16), torch.randn(2, 4, 16)
    keys = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    keys[1, ..., 2] = False
    out = block.joint(x, memory, keys)
    whole = block(torch.cat([memory, x], 1), keys)  # one sequence, whose memory rows are then dropped
    assert torch.allclose(out, whole[:, 3:], atol=1e-5)


def test_the_source_is_encoded_once_per_chain_with_the_same_result():
    model = perturb(model_of(**CLASSIFIER, self_condition=0.5)).eval()
    ids, mask, hold = packed()
    src = torch.where(mask, PAD, ids)
    memory = model.encode(model.embed(src), mask, src)
    z = torch.where(mask[..., None], torch.randn(4, 14, 8), model.embed(src))
    t, prev = torch.tensor([1999, 1500, 800, 3]), torch.randn(4, 14, 8)
    whole = model(z, t, prev, target_mask=mask, hold=hold)
    given = model(z, t, prev, target_mask=mask, hold=hold, memory=memory)
    assert torch.allclose(whole, given, atol=1e-5)
    calls = []
    model.encode_source = (lambda f: lambda *a: calls.append(1) or f(*a))(model.encode_source)
    denoise(model, AB, make_sampler("ads"), 10, src, mask, hold=hold, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 1  # ten steps, one encoding


def test_a_classifier_chain_ends_on_the_embeddings_of_its_own_argmax():
    model = perturb(model_of(**CLASSIFIER)).eval()
    ids, mask, hold = packed()
    src = torch.where(mask & ~hold, PAD, ids)
    for clamp in (True, False):
        z = denoise(model, AB, make_sampler("ads"), 5, src, mask, clamp=clamp, hold=hold, generator=torch.Generator().manual_seed(0))
        written = mask & ~hold
        distances = ((z[written][:, None] - model.table()[None]) ** 2).sum(-1)
        assert distances.min(-1).values.max() < 1e-8
    out = generate(
        model,
        AB,
        make_sampler("ads"),
        5,
        src,
        mask,
        hold=hold,
        generator=torch.Generator().manual_seed(0),
        banned=torch.tensor([PAD, CLS, SEP]),
    )
    assert not torch.isin(out[mask & ~hold], torch.tensor([PAD, CLS, SEP])).any()
    assert torch.equal(out[~(mask & ~hold)], src[~(mask & ~hold)])


# ---- the copied input's uniform alignment ----


def test_uniform_copy_spreads_the_source_over_the_targets_length():
    z = torch.arange(12.0).view(1, 12, 1)
    mask = torch.zeros(1, 12, dtype=torch.bool)
    mask[0, 6:] = True  # [CLS] s1 s2 s3 s4 [SEP] | target
    assert Denoiser.copied_source(z, mask).flatten()[6:].tolist() == [1, 2, 3, 4, 5, 5]
    assert Denoiser.copied_source(z, mask, torch.tensor([2])).flatten()[6:].tolist() == [1, 3, 5, 5, 5, 5]
    assert Denoiser.copied_source(z, mask, torch.tensor([5])).flatten()[6:].tolist() == [1, 1, 2, 3, 4, 5]
    with pytest.raises(Exception, match="copy_align uniform"):
        resolve("tiny", {"model": {"copy_input": True, "copy_align": "uniform"}})


# ---- the posterior input ----


def test_the_posterior_input_is_the_input_embedding_under_the_priors_posterior():
    model = perturb(model_of(**CLASSIFIER, input_posterior=True)).eval()
    ids, mask, hold = packed()
    z, t = torch.randn(4, 14, 8), torch.tensor([0, 400, 900, 1999])
    written = mask & ~hold
    got = model.posterior_input(z, t, written)
    E = model.table()
    coef = (AB[t].sqrt() / (1 - AB[t]))[:, None, None]
    probs = torch.softmax(coef * (z @ E.t()), -1)
    top, idx = probs.topk(16, -1)
    W = model.input_embedding.weight
    expected = (top[..., None] * W[idx]).sum(-2) + (1 - top.sum(-1, keepdim=True)) * W.mean(0)
    assert torch.allclose(got[written], expected[written], atol=1e-5)
    exact = probs @ W  # where the posterior is peaked (t = 0) the top tokens hold all of it
    assert torch.allclose(got[0][written[0]], exact[0][written[0]], atol=1e-4)
    assert torch.equal(got[~written], torch.zeros_like(got[~written]))
    plain = model_of(**CLASSIFIER)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("input_embedding")})
    assert not torch.allclose(plain(z, t, target_mask=mask, hold=hold), model(z, t, target_mask=mask, hold=hold))


# ---- time warping ----


def test_time_warping_draws_where_the_loss_rises_stratified_and_uniform_until_every_bin_is_seen():
    warp = WarpedTimesteps(2000, torch.device("cpu"), bins=4, floor=0.0)
    t, weights = warp.sample(8, torch.Generator().manual_seed(0))
    assert weights is None and sorted((t // 500).tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]  # stratified, uniform
    warp.update(torch.tensor([100, 700, 1200, 1800]), torch.tensor([0.0, 0.0, 4.0, 4.0]))
    assert torch.allclose(warp.weights(), torch.tensor([0.0, 0.5, 0.5, 0.0]))  # the rise is between bins 1 and 2
    t, _ = warp.sample(1000, torch.Generator().manual_seed(0))
    assert ((t >= 500) & (t < 1500)).all()
    warp.update(torch.tensor([100]), torch.tensor([9.0]))  # a noisy low bin (0.9 after averaging): the running maximum
    assert torch.allclose(warp.weights(), torch.tensor([0.0, 0.5, 0.5, 0.0]))  # keeps the curve monotone
    state = warp.state_dict()
    again = WarpedTimesteps(2000, torch.device("cpu"), bins=4, floor=0.0)
    again.load_state_dict(state)
    assert torch.equal(again.weights(), warp.weights())


# ---- the embedding's own learning rate ----


def test_the_embedding_gets_its_own_learning_rate():
    from diffutext.trainer import Trainer

    class Stub:
        pass

    stub = Stub()
    stub.model = model_of(**CLASSIFIER)
    stub.t_cfg = TrainConfig(lr=1e-3, embedding_lr=1e-2)
    groups = Trainer.param_groups(stub)
    assert [g["lr_scale"] for g in groups] == [1.0, 10.0]
    assert groups[1]["params"] == [stub.model.embedding.weight]
    stub.t_cfg = replace(stub.t_cfg, embedding_lr=0.0)
    assert len(Trainer.param_groups(stub)) == 1


# ---- from the command line ----


def test_a_classifier_run_trains_and_decodes_from_the_command_line(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(
        '[model]\narch = "encdec"\nx0_from = "classifier"\nembedding_norm = true\ntarget_length = "head"\n'
        'self_condition = 0.5\ncopy_input = true\ncopy_align = "uniform"\n[diffusion]\ntimestep_sampler = "warped"\n'
    )
    run = tmp_path / "run"
    result = invoke("train", "--preset", "tiny", "--config", config, "--out", run, "--max-steps", 6)
    assert result.exit_code == 0, result.output
    assert "ce " in result.stderr and "length " in result.stderr
    result = invoke("sample", "--checkpoint", run, "--limit", 3, "--steps", 5, "--show", 3)
    assert result.exit_code == 0, result.output
    result = invoke("sample", "--checkpoint", run, "--limit", 3, "--steps", 5, "--length", "free")
    assert result.exit_code == 2 and "never wrote padding" in result.stderr


# ---- the masked process (CMLM / Mask-Predict) ----

MASKED = dict(CLASSIFIER, output_prior=False)


def masked_model(seed=0):
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=40, hidden_dim=8, width=16, layers=2, heads=2, ffn=32, dropout=0.0, seq_len=14, time_dim=8, **MASKED)
    return Denoiser(config, AB, process="mask")


def test_the_masked_process_masks_at_rate_t_over_T_and_trains_on_the_masked_tokens_alone():
    from diffutext.masked import corrupt, mask_ratio

    model = perturb(masked_model())
    ids, mask, hold = packed()
    written = mask & ~hold
    x0 = model.embed(ids)
    u = torch.rand(4, 14, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([1999, 999, 0, 1499])
    z, masked = corrupt(x0, written, t, 2000, u, model.mask_embedding)
    assert torch.equal(masked, written & (u < ((t + 1) / 2000)[:, None]))
    assert masked[0].sum() == written[0].sum() and not masked[2].any()  # all at T − 1, none at t = 0 (here)
    assert torch.equal(z[masked], model.mask_embedding.expand(int(masked.sum()), 8)) and torch.equal(z[~masked], x0[~masked])
    noise = draw_noise((4, 14, 8), False, torch.Generator().manual_seed(2), absorbing=True)
    noise.absorb = u
    terms = classifier_loss(model, ids, mask, t, AB, noise=noise, hold=hold)
    _, logits = model(z, t, target_mask=mask, hold=hold, with_head=True)
    ce = F.cross_entropy(logits, ids[written], reduction="none")
    picked = masked[written]
    expected = torch.stack(
        [
            c[p].mean() if p.any() else torch.tensor(0.0)
            for c, p in zip(ce.split(written.sum(1).tolist()), picked.split(written.sum(1).tolist()))
        ]
    )
    assert torch.allclose(terms["ce"], expected, atol=1e-5)
    assert mask_ratio(torch.tensor(1999), 2000) == 1.0


def test_mask_predict_masks_again_the_least_confident_at_the_schedules_ratios():
    from diffutext.masked import mask_predict

    model = perturb(masked_model()).eval()
    ids, mask, hold = packed()
    src = torch.where(mask & ~hold, PAD, ids)
    seen = []
    forward = model.forward
    model.forward = lambda z, t, **kw: seen.append((z.clone(), kw)) or forward(z, t, **kw)
    timesteps = [1999, 999, 499, 0]
    out = mask_predict(model, timesteps, 2000, src, mask, hold)
    written = mask & ~hold
    n = written.sum(1)
    for (z, _), t in zip(seen, timesteps):
        is_masked = (z == model.mask_embedding).all(-1) & written
        assert torch.equal(is_masked.sum(1), torch.ceil(n * (t + 1) / 2000).long())  # ⌈n·r(t)⌉ masked when t is visited
    assert torch.equal(out[~written], src[~written]) and not (out[written] == PAD).all()
    with pytest.raises(Exception, match="masked process"):
        generate(model, AB, make_sampler("ads"), 4, src, mask, hold=hold)
    with pytest.raises(Exception, match="process mask"):
        resolve("tiny", {"diffusion": {"process": "mask"}})


# ---- the pointer-generator's copy ----


def test_the_copy_gate_adds_the_copied_tokens_logit_scaled_by_a_learned_gate():
    model = perturb(model_of(**CLASSIFIER, copy_input=True, copy_gate=True)).eval()
    ids, mask, hold = packed()
    z, t = torch.randn(4, 14, 8), torch.tensor([0, 400, 900, 1999])
    _, logits = model(z, t, target_mask=mask, hold=hold, with_head=True)
    written = mask & ~hold
    rows = written.reshape(-1).nonzero().squeeze(1)
    copied = model.copy_prior(z, mask, None, hold)
    h = model.out_norm(model.encode_decode(model._inputs(z, t, None, mask, copied, hold), mask, hold)).reshape(-1, 16)[rows]
    E = model.table()
    without = model.readout(h) + model.prior_logits(z.reshape(-1, 8)[rows], t, 14, rows)
    gate = F.softplus(model.copy_gate(h))
    assert torch.allclose(logits, without + gate * (copied.reshape(-1, 8)[rows] @ E.t()), atol=1e-4)
    fresh = model_of(**CLASSIFIER, copy_input=True, copy_gate=True)
    assert torch.allclose(F.softplus(fresh.copy_gate.bias), torch.tensor(F.softplus(torch.tensor(-4.0)).item()))
    with pytest.raises(Exception, match="copy_gate"):
        resolve("tiny", {"model": {"x0_from": "classifier", "copy_gate": True}})


def test_the_copy_attention_mixes_the_readout_with_an_attention_over_the_source_tokens_copies():
    model = perturb(model_of(**CLASSIFIER, copy_attention=True)).eval()
    ids, mask, hold = packed()
    z, t = torch.randn(4, 14, 8), torch.tensor([0, 400, 900, 1999])
    written = mask & ~hold
    rows = written.reshape(-1).nonzero().squeeze(1)
    h = model.out_norm(model.encode_decode(model._inputs(z, t, None, mask, None, hold), mask, hold))
    hr = h.reshape(-1, 16)[rows]
    lexicon = (torch.arange(40) + 1) % 40  # each token's lexicon copy is the next one
    model.lexicon.copy_(lexicon)
    x0_hat, logits = model(z, t, target_mask=mask, hold=hold, with_head=True, ids=ids)
    # by hand, row by row: attention over the source's own tokens (between [CLS] and its [SEP]), a share β of each
    # weight onto the token itself and 1 − β onto its lexicon copy
    switch, share = torch.sigmoid(model.pointer_switch(hr)).unbind(-1)  # π and β
    copy = torch.zeros(len(rows), 40)
    for n, r in enumerate(rows.tolist()):
        b, m = r // 14, int(mask[r // 14].int().argmax()) - 2  # row b's source holds m tokens, at 1..m
        attention = torch.softmax(model.pointer_query(hr[n]) @ model.pointer_key(h[b, 1 : m + 1]).t() / 8.0, -1)
        copy[n].index_add_(0, ids[b, 1 : m + 1], share[n] * attention)
        copy[n].index_add_(0, lexicon[ids[b, 1 : m + 1]], (1 - share[n]) * attention)
    switch = switch[:, None]
    mixed = (1 - switch) * torch.softmax(model.readout(hr), -1) + switch * copy
    expected = mixed.log() + model.prior_logits(z.reshape(-1, 8)[rows], t, 14, rows)
    assert torch.allclose(logits, expected, atol=1e-4)
    assert torch.allclose(x0_hat.reshape(-1, 8)[rows], torch.softmax(expected, -1) @ model.table(), atol=1e-5)
    # a switch held open, all of it on s itself, copies only source tokens: every other token's probability
    # vanishes without the prior
    with torch.no_grad():
        model.pointer_switch.bias.fill_(30.0)
    model.config = replace(model.config, output_prior=False)
    _, logits = model(z, t, target_mask=mask, hold=hold, with_head=True, ids=ids)
    probs = torch.softmax(logits, -1)
    for n, r in enumerate(rows.tolist()):
        b, m = r // 14, int(mask[r // 14].int().argmax()) - 2
        assert probs[n, ids[b, 1 : m + 1].unique()].sum() > 0.999
    fresh = model_of(**CLASSIFIER, copy_attention=True)
    assert torch.equal(torch.sigmoid(fresh.pointer_switch.bias), torch.tensor([0.5, 0.5]))
    assert not hasattr(model_of(**CLASSIFIER), "pointer_switch")
    with pytest.raises(Exception, match="copy_attention"):
        resolve("tiny", {"model": {"copy_attention": True}})


def test_the_copy_diagonal_adds_minus_lambda_times_the_offset_to_the_copy_attentions_scores():
    model = perturb(model_of(**CLASSIFIER, copy_attention=True)).eval()
    assert model.copy_diagonal == 0.0  # trained without it
    ids, mask, hold = packed()
    z, t = torch.randn(4, 14, 8), torch.tensor([0, 400, 900, 1999])
    written = mask & ~hold
    rows = written.reshape(-1).nonzero().squeeze(1)
    h = model.out_norm(model.encode_decode(model._inputs(z, t, None, mask, None, hold), mask, hold))
    hr = h.reshape(-1, 16)[rows]
    share = torch.sigmoid(model.pointer_switch(hr))[:, 1]

    def by_hand(n, r, lam):
        b, start = r // 14, int(mask[r // 14].int().argmax())
        m, k = start - 2, r % 14 - start + 1  # row b's source holds m tokens, at 1..m; row r writes target token k
        scores = model.pointer_query(hr[n]) @ model.pointer_key(h[b, 1 : m + 1]).t() / 8.0
        return share[n] * torch.softmax(scores - lam * (torch.arange(1, m + 1) - k).abs(), -1)

    for lam in (0.0, 1.5, 40.0):
        model.copy_diagonal = lam
        _, _, weights = model.pointer(h, hr, rows, ids, mask)
        for n, r in enumerate(rows.tolist()):
            m = int(mask[r // 14].int().argmax()) - 2
            assert torch.allclose(weights[n, 1 : m + 1], by_hand(n, r, lam), atol=1e-5)
    # a steep prior copies the aligned source token: target token k takes source token k (the last one past the end)
    for n, r in enumerate(rows.tolist()):
        start = int(mask[r // 14].int().argmax())
        assert weights[n, min(r % 14 - start + 1, start - 2)] > 0.99 * share[n]


def test_the_copies_mix_in_log_space_as_the_dense_mixture_does_repeated_tokens_adding_up():
    g = torch.Generator().manual_seed(0)
    logits, switch = 4 * torch.randn(5, 30, generator=g), 3 * torch.randn(5, 1, generator=g)
    tokens = torch.randint(0, 8, (5, 12), generator=g)  # many repeats among 8 tokens
    weights = torch.rand(5, 12, generator=g) + 0.01
    weights = weights / weights.sum(1, keepdim=True)

    def dense(logits, weights):
        pi = torch.sigmoid(switch)
        return ((1 - pi) * torch.softmax(logits, -1) + pi * torch.zeros(5, 30).scatter_add(1, tokens, weights)).log()

    silent = weights * (torch.rand(5, 12, generator=g) > 0.3)  # entries that copy nothing (outside the source)
    assert torch.allclose(mix_copies(logits, switch, tokens, silent), dense(logits, silent), atol=1e-5)
    with torch.no_grad():  # in place when nothing is recorded: the same values
        assert torch.allclose(mix_copies(logits.clone(), switch, tokens, silent), dense(logits, silent), atol=1e-5)
    logits.requires_grad_(True)
    weights.requires_grad_(True)
    got, want = mix_copies(logits, switch, tokens, weights), dense(logits, weights)
    assert torch.allclose(got, want, atol=1e-5)
    probe = torch.randn(5, 30, generator=g)  # the gradients agree too: no repeated token counted twice
    grads = [torch.autograd.grad((out * probe).sum(), [logits, weights]) for out in (got, want)]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*grads))


def test_the_masked_process_from_the_command_line(small_task, tmp_path):
    """`train --process mask` with what it needs, then mask-predict decoding; the Gaussian samplers' update refused."""
    from helpers import assert_one_line_error

    net = ["--preset", "tiny", "--task", small_task, "--x0-from", "classifier", "--arch", "encdec", "--target-length", "head"]
    assert_one_line_error(invoke("train", *net, "--process", "mask", "--self-condition", 0.5, "--out", tmp_path / "x"), "process mask")
    result = invoke("train", *net, "--process", "mask", "--max-steps", 2, "--out", tmp_path / "run", "--device", "cpu")
    assert result.exit_code == 0, result.output
    out = tmp_path / "o.jsonl"
    result = invoke("sample", "--checkpoint", tmp_path / "run", "--update", "mask", "--steps", 3, "--limit", 2, "--out", out, "--show", 0)
    assert result.exit_code == 0, result.output
    assert len(out.read_text().splitlines()) == 2


def test_the_copy_diagonal_from_the_command_line_auto_a_weight_or_off(small_task, tmp_path, monkeypatch):
    """`--copy-diagonal` at decoding: auto is COPY_DIAGONAL_AUTO for a run with the copy attention, a weight is
    used as given, off leaves the attention as trained; the decode says which, and sets it on the model; a model
    without the copy attention refuses a weight in one line and decodes without one under auto."""
    import json

    from diffutext import evaluate
    from diffutext.model import Denoiser
    from helpers import assert_one_line_error

    seen = []
    pointer = Denoiser.pointer
    monkeypatch.setattr(Denoiser, "pointer", lambda self, *a: seen.append(self.copy_diagonal) or pointer(self, *a))
    net = ["--preset", "tiny", "--task", small_task, "--x0-from", "classifier", "--arch", "encdec", "--target-length", "head"]
    run = tmp_path / "run"
    assert invoke("train", *net, "--copy-attention", "--max-steps", 2, "--out", run, "--device", "cpu").exit_code == 0
    for extra, expected in (([], evaluate.COPY_DIAGONAL_AUTO), (["--copy-diagonal", 0.5], 0.5), (["--copy-diagonal", "off"], None)):
        out, seen[:] = tmp_path / "m.json", []
        result = invoke("evaluate", "--checkpoint", run, "--limit", 2, "--steps", 4, "--device", "cpu", "--json", out, *extra)
        assert result.exit_code == 0, result.output
        assert json.loads(out.read_text())["copy_diagonal"] == expected and set(seen) == {expected or 0.0}
        assert (f"copy diagonal {expected or 0:g}" in result.output) == (expected is not None)
    assert_one_line_error(invoke("sample", "--checkpoint", run, "--copy-diagonal", "-1"), "--copy-diagonal")
    plain = tmp_path / "plain"
    assert invoke("train", *net, "--max-steps", 2, "--out", plain, "--device", "cpu").exit_code == 0
    assert invoke("sample", "--checkpoint", plain, "--limit", 2, "--steps", 4, "--show", 0).exit_code == 0
    assert_one_line_error(invoke("sample", "--checkpoint", plain, "--limit", 2, "--copy-diagonal", 1), "copy attention", alone=False)


# ---- DINOISER's condition-enhanced denoiser ----


def test_cedi_tells_the_denoiser_high_noise_while_the_sample_follows_its_schedule(monkeypatch):
    from diffutext.samplers import cedi_timesteps

    assert cedi_timesteps(2000, 5, 0.99) == [1999, 1994, 1989, 1984, 1979]  # T−1 down to 0.99·(T−1), evenly
    assert cedi_timesteps(2000, 1, 0.99) == [1999]
    model = perturb(model_of(**CLASSIFIER)).eval()  # a trained-looking model: its output depends on t
    ids, mask, hold = packed()
    told = []
    real = Denoiser.forward
    monkeypatch.setattr(Denoiser, "forward", lambda self, z, t, *a, **k: told.append(int(t[0])) or real(self, z, t, *a, **k))
    g = torch.Generator().manual_seed(0)
    plain = generate(model, AB, make_sampler("ads"), 5, ids, mask, hold=hold, generator=g)
    schedule, told[:] = list(told), []
    g.manual_seed(0)
    enhanced = generate(model, AB, make_sampler("ads"), 5, ids, mask, hold=hold, generator=g, cedi=0.99)
    assert schedule == [t for t, _, _ in make_sampler("ads").triples(AB, 5)] and told == cedi_timesteps(2000, 5, 0.99)
    assert not torch.equal(plain, enhanced)


def test_cedi_auto_is_on_for_a_classifier_run_alone_and_the_flag_takes_auto_off_or_a_share(tiny_run):
    from diffutext.evaluate import resolve_cedi

    classifier, regression = resolve("small"), resolve("tiny")
    assert resolve_cedi("auto", classifier) == 0.99 and resolve_cedi("auto", regression) is None
    assert resolve_cedi(None, classifier) is None and resolve_cedi(0.5, regression) == 0.5
    masked = resolve("small", {"model": {"self_condition": 0.0}, "diffusion": {"process": "mask"}})
    assert resolve_cedi("auto", masked) is None
    args = ("sample", "--checkpoint", tiny_run, "--limit", 2, "--steps", 4, "--show", 0, "--device", "cpu")
    for value in ("auto", "off", "0.9"):
        assert invoke(*args, "--cedi", value).exit_code == 0, value
    from helpers import assert_one_line_error

    for bad in ("1.5", "x", "nan"):
        assert_one_line_error(invoke(*args, "--cedi", bad), "--cedi", code=2)
