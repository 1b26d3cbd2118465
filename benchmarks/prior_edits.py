"""What a copy-prior run learns beyond its prior: for each run, the target tokens of a split that the prior
already has right at their position ("kept") and those it has wrong ("edits"), noised to t with fixed noise, and
the share of each that the rounded prediction x0_hat (nearest embedding) gets right, side by side.

    python benchmarks/prior_edits.py runs/a runs/b                 # the valid split of each run's task
    python benchmarks/prior_edits.py runs/a --split test --t 100 1000 1999

The text a sampler writes can stay the prior's while the network learns edits below it; this shows how many.
"""

from __future__ import annotations

import argparse

import torch

from diffutext.data.batches import pack_split
from diffutext.data.tasks import load_split
from diffutext.diffusion import q_sample
from diffutext.evaluate import load_model
from diffutext.model import Denoiser, conditioning


def shares(run: str, split: str, steps: list[int], seed: int = 0) -> tuple[int, int, list[tuple[float, float]]]:
    """(edits, kept, [(edits right, kept right) for each t]) of one run."""
    loaded = load_model(run)
    model, ck = loaded.model, loaded.checkpoint
    vocab = ck.vocab
    packed = pack_split(load_split(ck.config.train.task, split, ck.config.train.data_dir), vocab, ck.config.model.seq_len)
    ids, mask = packed.ids[:].long(), packed.target_mask[:].bool()
    lexicon = getattr(model, "lexicon", torch.arange(vocab.size))
    prior = Denoiser.copied_source(lexicon[ids].unsqueeze(-1).float(), mask).squeeze(-1).long()
    real = mask & (ids != vocab.pad) & (ids != vocab.sep)
    edit, kept = real & (ids != prior), real & (ids == prior)
    weight = model.embedding.weight
    g = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        x0 = model.embed(ids)
        for t0 in steps:
            t = torch.full((ids.shape[0],), t0)
            z = q_sample(x0, t, loaded.alpha_bar, torch.randn(x0.shape, generator=g), mask)
            x0_hat = model(z, t, **conditioning(model, ids, mask))
            dist = x0_hat.pow(2).sum(-1, keepdim=True) - 2 * x0_hat @ weight.t() + weight.pow(2).sum(-1)
            right = dist.argmin(-1) == ids
            out.append((right[edit].float().mean().item(), right[kept].float().mean().item()))
    return int(edit.sum()), int(kept.sum()), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--split", default="valid")
    ap.add_argument("--t", type=int, nargs="+", default=[200, 1000, 1800])
    args = ap.parse_args()
    print("run | edits / kept | " + " | ".join(f"t = {t}: edits right, kept right" for t in args.t))
    for run in args.runs:
        edits, kept, cells = shares(run, args.split, args.t)
        print(f"{run} | {edits} / {kept} | " + " | ".join(f"{e:.3f}, {k:.3f}" for e, k in cells), flush=True)


if __name__ == "__main__":
    main()
