"""Turning decoded ids into text, as DiffuSeq's evaluation does."""

import torch

from diffutext.data.tokenizer import train_bpe
from diffutext.evaluate import _to_text


def test_special_tokens_are_dropped_not_cut_at():
    vocab = train_bpe(["the cat sat on the mat", "a dog ran"], 80)
    cat, dog = vocab.encode(["the cat sat"])[0], vocab.encode(["a dog ran"])[0]
    src = vocab.encode(["source"])[0]
    row = [vocab.cls, *src, vocab.sep, *cat, vocab.sep, vocab.pad, *dog, vocab.pad, vocab.pad]
    mask = [False] * (len(src) + 2) + [True] * (len(row) - len(src) - 2)
    text = _to_text(torch.tensor([row]), torch.tensor([mask]), vocab)
    assert text == ["the cat sat a dog ran"]  # the source side is never part of the output


def test_decode_reports_every_denoising_step_to_the_view(tiny_run):
    """decode emits one "step" event per denoising step of every chain (K seeds × batches), in order, and DecodeView
    shows them as a progress row of its own."""
    import datasets

    from diffutext.config import SampleConfig
    from diffutext.evaluate import decode, load_model
    from diffutext.views import DecodeView

    events = []
    ds = datasets.Dataset.from_dict({"src": ["In the beginning", "And God said", "Let there be light"], "trg": ["a", "b", "c"]})
    cfg = SampleConfig(sampler="ads", steps=5, seeds=2, batch_size=2)
    with DecodeView("test") as view:

        def record(event, info):
            events.append((event, info))
            view(event, info)

        decode(load_model(tiny_run), ds, cfg, record)
        chain = view.progress.tasks[view.chain]
    steps = [info["done"] for event, info in events if event == "step"]
    assert steps == [1, 2, 3, 4, 5] * 4  # 2 batches × 2 seeds
    assert [info["t"] for event, info in events if event == "step"][:5] == [1999, 1334, 1000, 667, 0]  # ADS-5, method.md §4
    assert chain.description == "denoising steps" and chain.completed == 5 and chain.total == 5


def test_dedup_drops_each_target_token_that_repeats_the_one_before_it():
    class Words:
        def decode(self, rows):
            return [" ".join(map(str, r)) for r in rows]

    ids = torch.tensor([[1, 7, 2, 7, 7, 5, 5, 5, 9, 2], [1, 4, 2, 4, 6, 4, 6, 6, 2, 0]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert _to_text(ids, mask, Words()) == ["7 7 5 5 5 9 2", "4 6 4 6 6 2 0"]
    # the first target token is kept whatever the source ends with; only consecutive repeats go
    assert _to_text(ids, mask, Words(), dedup=True) == ["7 5 9 2", "4 6 4 6 2 0"]


def test_dedup_from_the_command_line_is_named_in_the_label_and_the_json(tiny_run, tmp_path):
    import json

    from helpers import invoke

    out = tmp_path / "m.json"
    r = invoke("evaluate", "--checkpoint", tiny_run, "--limit", 3, "--steps", 4, "--device", "cpu", "--dedup", "--json", out)
    assert r.exit_code == 0, r.output
    assert "repeats dropped" in r.output and json.loads(out.read_text())["dedup"] is True
