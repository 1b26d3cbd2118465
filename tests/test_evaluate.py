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
