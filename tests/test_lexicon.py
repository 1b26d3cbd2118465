"""The copy prior's lexicon (Guo et al. 2019's phrase-table lookup, diffutext/lexicon.py): the count pinned by hand,
the model copying lex(s) instead of s, and a real training run that counts it, announces it and stores it."""

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from diffutext import metrics
from diffutext.cli import app
from diffutext.config import ConfigError, ModelConfig, resolve
from diffutext.data.tasks import load_eval_split, references
from diffutext.diffusion import alpha_bar_table
from diffutext.lexicon import aligned_pairs, build_lexicon, translate
from diffutext.model import Denoiser
from diffutext.samplers import denoise, make_sampler
from diffutext.train import train

PAD, CLS, SEP = 0, 2, 3
SPECIALS = [PAD, CLS, SEP]


def packed(rows):
    """[CLS] src [SEP] trg [SEP] rows padded to one length, and their target masks."""
    L = max(len(s) + len(t) + 3 for s, t in rows)
    ids = torch.full((len(rows), L), PAD)
    mask = torch.zeros(len(rows), L, dtype=torch.bool)
    for i, (s, t) in enumerate(rows):
        seq = [CLS, *s, SEP, *t, SEP]
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, len(s) + 2 :] = True
    return ids, mask


def test_aligned_pairs_pair_target_token_k_with_source_token_k_while_both_last():
    ids, mask = packed([([5, 6, 7], [8, 9]), ([10], [11, 12, 13])])
    src, trg = aligned_pairs(ids, mask, SPECIALS)
    assert sorted(zip(src.tolist(), trg.tolist())) == [(5, 8), (6, 9), (10, 11)]


def test_lexicon_keeps_the_most_aligned_token_above_the_share_and_the_count():
    # 6 keeps → 20 (4 of 10 alignments: share 0.4); 7 → 21 or 22 tie (2 of 4 each): the smaller id, 21;
    # 8 is aligned with itself most (3 of 5): stays; 9 is aligned twice only: below the count, stays.
    rows = (
        [([6], [20])] * 4
        + [([6], [30 + i]) for i in range(3)]
        + [([6], [6])] * 3
        + [([7], [21])] * 2
        + [([7], [22])] * 2
        + [([8], [8])] * 3
        + [([8], [23])] * 2
        + [([9], [24])] * 2
    )
    ids, mask = packed(rows)
    lex = build_lexicon(ids, mask, 40, share=0.3, specials=SPECIALS, min_count=4)
    assert lex[6] == 20 and lex[7] == 21 and lex[8] == 8 and lex[9] == 9
    assert torch.equal(lex[:6], torch.arange(6)) and torch.equal(lex[10:], torch.arange(10, 40))
    assert build_lexicon(ids, mask, 40, share=0.5, specials=SPECIALS, min_count=4)[6] == 6  # 0.4 is under 0.5
    assert build_lexicon(ids, mask, 40, share=0.3, specials=SPECIALS, min_count=11)[6] == 6  # 10 alignments only


def tiny(copy_lexicon=0.0):
    torch.manual_seed(0)
    return Denoiser(
        ModelConfig(
            vocab_size=50,
            hidden_dim=8,
            width=16,
            layers=1,
            heads=2,
            ffn=32,
            dropout=0.0,
            seq_len=12,
            time_dim=8,
            copy_source="on",
            copy_lexicon=copy_lexicon,
        )
    ).eval()


def test_the_copy_prior_copies_each_source_token_as_its_lexicon_entry():
    model = tiny(0.2)
    with torch.no_grad():
        model.lexicon[8] = 30  # "8 is written 30"
        model.down[2].weight.normal_()
    ids = torch.tensor([[CLS, 7, 8, 9, SEP, 0, 0, 0, 0, 0, 0, 0]])
    mask = (torch.arange(12) >= 5)[None]
    z = torch.where(mask[..., None], torch.randn(1, 12, 8), model.embed(ids))
    t = torch.tensor([900])
    plain = tiny()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k != "lexicon"})
    translated = ids.clone()
    translated[0, 2] = 30
    expected = plain(z, t, target_mask=mask) - Denoiser.copied_source(z, mask) + Denoiser.copied_source(model.embed(translated), mask)
    assert torch.allclose(model(z, t, target_mask=mask, ids=ids)[0, 5:], expected[0, 5:], atol=1e-6)
    with pytest.raises(ValueError):
        model(z, t, target_mask=mask)


def test_an_untrained_lexicon_model_decodes_the_translated_source():
    model = tiny(0.2)
    with torch.no_grad():
        model.lexicon[8] = 30
    ids = torch.tensor([[CLS, 7, 8, 9, SEP, 0, 0, 0, 0, 0, 0, 0]])
    mask = (torch.arange(12) >= 5)[None]
    z = denoise(model, alpha_bar_table("sqrt", 2000).float(), make_sampler("ads"), 5, ids, mask, generator=torch.Generator().manual_seed(0))
    assert torch.cdist(z[0, 5:], model.embedding.weight.detach()).argmin(-1).tolist() == [7, 30, 9, SEP, SEP, SEP, SEP]


def test_the_lexicon_is_a_share_and_is_stored_off_without_the_copy_prior(tmp_path):
    with pytest.raises(ConfigError, match="copy_lexicon"):
        resolve("tiny", {"model": {"copy_source": "on", "copy_lexicon": 1.5}})
    r = CliRunner().invoke(
        app,
        [
            "train",
            "--preset",
            "tiny",
            "--copy-source",
            "off",
            "--copy-lexicon",
            "0.2",
            "--max-steps",
            "1",
            "--out",
            str(tmp_path / "off"),
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "off" / "config.json").read_text())["model"]["copy_lexicon"] == 0.0
    assert "lexicon" not in load_file(tmp_path / "off" / "checkpoints" / "step-00000001" / "ema.safetensors")


def test_training_counts_the_lexicon_from_the_split_and_stores_it_with_the_weights(tmp_path):
    """bible-basic: thou is copied as you; the line names the entries; model and EMA weights both hold the table;
    a resumed run keeps it; `ablate` scores the lookup beside the copy; a negative share is refused (exit 2)."""
    events = []
    cfg = resolve(
        "tiny", {"model": {"copy_source": "auto", "copy_lexicon": 0.15}, "train": {"max_steps": 2, "eval_every": 0, "vocab_size": 1000}}
    )
    run = train(cfg, tmp_path / "run", device="cpu", callback=lambda e, info: events.append((e, info)))
    assert json.loads((run / "config.json").read_text())["model"]["copy_lexicon"] == 0.15
    line = next(i["message"] for e, i in events if e == "choice" and "copy lexicon" in i["message"])
    assert "thou → you" in line
    from diffutext.data import tokenizer as tok

    vocab = tok.load(run / "tokenizer.json")
    thou, you = (vocab.encode([w])[0][0] for w in (" thou", " you"))
    for name in ("model", "ema"):
        lex = load_file(run / "checkpoints" / "step-00000002" / f"{name}.safetensors")["lexicon"]
        assert lex[thou] == you and lex[vocab.sep] == vocab.sep
    r = CliRunner().invoke(app, ["train", "--out", str(run), "--resume", "--max-steps", "3", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert torch.equal(load_file(run / "checkpoints" / "step-00000003" / "ema.safetensors")["lexicon"], lex)
    ablate = tmp_path / "ablate"
    r = CliRunner().invoke(
        app,
        ["ablate", "--checkpoint", str(run), "--sampler", "ads", "--steps", "3", "--limit", "20", "--out", str(ablate), "--device", "cpu"],
    )
    assert r.exit_code == 0, r.output
    assert "lexicon lookup" in r.output
    rows = {row["sampler"]: row for row in json.loads((ablate / "results.json").read_text())["rows"]}
    test = load_eval_split("bible-basic", "test").select(range(20))
    looked_up = translate(list(test["src"]), vocab, lex)
    assert rows["lexicon lookup"]["sacrebleu"] == pytest.approx(metrics.score(looked_up, references(test))["sacrebleu"])
    assert looked_up != list(test["src"]) and rows["lexicon lookup"]["sacrebleu"] != rows["copy source"]["sacrebleu"]
    r = CliRunner().invoke(
        app, ["train", "--preset", "tiny", "--copy-source", "on", "--copy-lexicon", "-1", "--out", str(tmp_path / "bad")]
    )
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert not (tmp_path / "bad").exists()


# ---- the target length of the copy: --length source ----


def test_source_length_puts_the_sep_after_as_many_target_tokens_as_the_source_has():
    from diffutext.evaluate import source_length

    ids = torch.tensor([[CLS, 5, 6, SEP] + [PAD] * 9, [CLS, 5, 6, 7, 8, SEP] + [PAD] * 7])  # as decoding packs them
    mask = torch.arange(13)[None] >= torch.tensor([[4], [6]])  # the target side: after the source's [SEP]
    hold = source_length(ids, mask, SEP)
    # row 0: target positions 4, 5 free (two source tokens), [SEP] at 6, padding after; row 1: 6..9 free, [SEP] at 10
    assert ids[0].tolist() == [CLS, 5, 6, SEP, PAD, PAD, SEP] + [PAD] * 6 and ids[1, 10] == SEP
    assert hold[0].nonzero().squeeze(1).tolist() == list(range(6, 13))
    assert hold[1].nonzero().squeeze(1).tolist() == [10, 11, 12]


def test_held_positions_stay_clean_and_the_chain_writes_only_the_free_ones():
    from diffutext.samplers import generate

    model = tiny(0.2)
    with torch.no_grad():
        model.down[2].weight.normal_()  # a network that writes something else than the copy
    ids = torch.tensor([[CLS, 7, 8, 9, SEP, PAD, PAD, PAD, SEP, PAD, PAD, PAD]])
    mask = (torch.arange(12) >= 5)[None]
    hold = mask & (torch.arange(12) >= 8)[None]
    ab = alpha_bar_table("sqrt", 2000).float()
    g = lambda: torch.Generator().manual_seed(0)
    z = denoise(model, ab, make_sampler("ads"), 5, ids, mask, generator=g(), hold=hold)
    assert torch.equal(z[0, 8:], model.embed(ids)[0, 8:].detach())
    out = generate(model, ab, make_sampler("ads"), 5, ids, mask, generator=g(), hold=hold)
    assert out[0, 8:].tolist() == [SEP, PAD, PAD, PAD]
    free = generate(model, ab, make_sampler("ads"), 5, ids, mask, generator=g())
    assert free[0, 8:].tolist() != [SEP, PAD, PAD, PAD]  # without holding, the network's own choice


def test_sample_with_length_source_writes_no_more_tokens_than_the_source(tmp_path):
    cfg = resolve("tiny", {"model": {"copy_source": "on", "copy_lexicon": 0.15}, "train": {"max_steps": 2, "eval_every": 0}})
    run = train(cfg, tmp_path / "run", device="cpu")
    from diffutext.data import tokenizer as tok

    vocab = tok.load(run / "tokenizer.json")
    r = CliRunner().invoke(
        app,
        [
            "sample",
            "--checkpoint",
            str(run),
            "--steps",
            "3",
            "--limit",
            "6",
            "--length",
            "source",
            "--out",
            str(tmp_path / "out.jsonl"),
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    for row in rows:
        n_src = min(len(vocab.encode([row["src"]])[0]), (48 - 3) // 2)
        assert len(vocab.encode([row["hyp"]])[0]) <= n_src
    r = CliRunner().invoke(
        app,
        [
            "sample",
            "--checkpoint",
            str(run),
            "--steps",
            "3",
            "--limit",
            "6",  # auto: a copy-prior run
            "--out",
            str(tmp_path / "auto.jsonl"),
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 0, r.output
    assert (tmp_path / "auto.jsonl").read_text() == (tmp_path / "out.jsonl").read_text()


def test_length_auto_follows_the_copy_prior():
    from diffutext.evaluate import resolve_length

    on = resolve("tiny", {"model": {"copy_source": "on"}})
    assert resolve_length("auto", on) == "source" and resolve_length("auto", resolve("tiny")) == "free"
    assert resolve_length("free", on) == "free" and resolve_length("source", resolve("tiny")) == "source"


def test_banned_tokens_are_never_picked_by_either_clamp():
    from diffutext.samplers import generate, head_indices

    model = tiny()
    rows = model.embedding.weight.detach()[[SEP, PAD, 7]] + 0.01
    banned = torch.tensor([PAD, CLS, SEP])
    picked = head_indices(model, rows, banned).tolist()
    assert not set(picked) & {PAD, CLS, SEP}
    ids = torch.tensor([[CLS, 7, 8, 9, SEP, PAD, PAD, PAD, SEP, PAD, PAD, PAD]])
    mask = (torch.arange(12) >= 5)[None]
    hold = mask & (torch.arange(12) >= 8)[None]
    with torch.no_grad():  # a network that writes [SEP] everywhere
        model.down[2].bias.copy_(model.embedding.weight[SEP] * 5)
    for by in ("nearest", "head"):
        out = generate(
            model,
            alpha_bar_table("sqrt", 2000).float(),
            make_sampler("ads"),
            5,
            ids,
            mask,
            generator=torch.Generator().manual_seed(0),
            hold=hold,
            banned=banned,
            clamp_by=by,
        )
        assert not set(out[0, 5:8].tolist()) & {PAD, CLS, SEP} and out[0, 8] == SEP
        free = generate(
            model,
            alpha_bar_table("sqrt", 2000).float(),
            make_sampler("ads"),
            5,
            ids,
            mask,
            generator=torch.Generator().manual_seed(0),
            hold=hold,
            clamp_by=by,
        )
        assert SEP in free[0, 5:8].tolist()


def test_ibm1_learns_a_translation_wherever_the_words_stand():
    from diffutext.lexicon import ibm1_lexicon

    # 6 means 20 and 7 means 21, but in the pairs holding both the order is swapped: counting by position
    # pairs 6 with 21; IBM Model 1's EM uses the pairs where each word stands alone to sort it out.
    rows = [([6], [20])] * 10 + [([7], [21])] * 10 + [([6, 7], [21, 20])] * 30 + [([8], [8])] * 10 + [([9], [25])] * 3
    ids, mask = packed(rows)
    lex = ibm1_lexicon(ids, mask, 40, share=0.5, specials=SPECIALS, min_count=5)
    assert lex[6] == 20 and lex[7] == 21 and lex[8] == 8  # 8 translates as itself
    assert lex[9] == 9  # seen 3 times: below the count
    assert torch.equal(lex[torch.tensor(SPECIALS)], torch.tensor(SPECIALS))
    by_position = build_lexicon(ids, mask, 40, share=0.5, specials=SPECIALS, min_count=5)
    assert by_position[6] == 21  # what the positional count gets wrong
    assert ibm1_lexicon(ids, mask, 40, share=0.99, specials=SPECIALS, min_count=5)[6] == 6  # below the share: itself
