"""The autoregressive reference (benchmarks/autoregressive.py): its batches and a short run end to end."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))

import autoregressive  # noqa: E402


def test_bucketed_batches_cover_an_epoch_once_with_less_padding_than_random_ones():
    torch.manual_seed(0)
    lengths = torch.randint(5, 80, (3200,))

    def padding(batches):
        return sum(int(lengths[b].max()) * len(b) - int(lengths[b].sum()) for b in batches)

    bucket, random = autoregressive.epoch_batches(lengths, 32, "bucket"), autoregressive.epoch_batches(lengths, 32, "random")
    for batches in (bucket, random):
        assert all(len(b) == 32 for b in batches)
        assert sorted(i for b in batches for i in b) == list(range(3200))
    assert padding(bucket) < 0.2 * padding(random)
    assert [b[0] for b in bucket] != sorted(b[0] for b in bucket)  # the batches' order is shuffled too


def test_the_reference_trains_and_decodes_a_file(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"src": s, "trg": s}) + "\n" for s in ["In the beginning God.", "And God said."]))
    r = autoregressive.run("bible-basic", minutes=0.01, eval_file=pairs)
    assert r["steps"] >= 1 and r["batching"] == "bucket"
    assert len(r["hyps"]) == 2 and r["sources"] == ["In the beginning God.", "And God said."]
    assert 0 <= r["sacrebleu"] <= 100 and abs(r["copy_sacrebleu"] - 100) < 1e-6
