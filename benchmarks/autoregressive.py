"""The autoregressive reference: a plain encoder–decoder transformer trained for the same wall time on the
same task and CPU, greedy decoding, scored like diffutext's runs, beside copying the source.

    python benchmarks/autoregressive.py --minutes 14                 # bible-basic, test split
    python benchmarks/autoregressive.py --minutes 14 --split valid --seed 1

nn.Transformer with 3 + 3 pre-LN layers of width 256 (4 heads, feed-forward 1024), the task's BPE of
8,000 entries trained on its training split (diffutext's tokenizer), tied input/output embeddings,
batch 32 padded to the longest in the batch, the batches cut from runs of 50 batches' worth of pairs sorted by
length (fairseq's and torchtext's bucketing: little padding; a fresh order every epoch; `--batching random` for
batches of random pairs), AdamW at 1e-3 with 200 warm-up
steps and a linear decay to 0 at the budget, label smoothing 0.1, fp32 (`--precision bf16` autocasts: it
measured slower for this model on a 2-core CPU, 0.34 against 0.25 s a step), greedy decoding. The tied
embedding starts at std 1/√256, so that its input times √256 has unit variance and the tied head's
logits start near 0. It is the bar a diffusion toolkit has to clear at
equal compute, so it is measured here, not quoted.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from diffutext import metrics
from diffutext.data import tokenizer as tok
from diffutext.data.tasks import load_eval_split, load_split, read_inputs, references
from diffutext.device import autocast, resolve_precision

warnings.filterwarnings("ignore", category=UserWarning, module="torch.nn")  # nested-tensor and mask-type notices


class Seq2Seq(nn.Module):
    def __init__(self, vocab: int, width: int = 256, layers: int = 3, max_len: int = 256):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(max_len, width)
        self.core = nn.Transformer(width, 4, layers, layers, 4 * width, 0.1, batch_first=True, norm_first=True)
        self.scale = math.sqrt(width)
        # tied input/output embeddings: std 1/√width, so that the input (times √width) has unit variance and the
        # tied head's logits start near 0 (N(0, 1) rows would start them √width = 16 times too large)
        nn.init.normal_(self.embed.weight, std=width**-0.5)
        nn.init.normal_(self.pos.weight, std=0.5)

    def _in(self, ids):
        return self.embed(ids) * self.scale + self.pos.weight[: ids.shape[1]]

    def forward(self, src, trg_in, src_pad, trg_pad):
        causal = self.core.generate_square_subsequent_mask(trg_in.shape[1], device=src.device)
        h = self.core(
            self._in(src),
            self._in(trg_in),
            tgt_mask=causal,
            src_key_padding_mask=src_pad,
            tgt_key_padding_mask=trg_pad,
            memory_key_padding_mask=src_pad,
            tgt_is_causal=True,
        )
        return h @ self.embed.weight.t()  # tied output layer

    @torch.no_grad()
    def greedy(self, src, src_pad, bos: int, eos: int, max_len: int):
        memory = self.core.encoder(self._in(src), src_key_padding_mask=src_pad)
        out = torch.full((src.shape[0], 1), bos, dtype=torch.long)
        done = torch.zeros(src.shape[0], dtype=torch.bool)
        for _ in range(max_len):
            causal = self.core.generate_square_subsequent_mask(out.shape[1])
            h = self.core.decoder(self._in(out), memory, tgt_mask=causal, memory_key_padding_mask=src_pad, tgt_is_causal=True)
            nxt = (h[:, -1] @ self.embed.weight.t()).argmax(-1).masked_fill(done, eos)
            out = torch.cat([out, nxt[:, None]], 1)
            done |= nxt == eos
            if bool(done.all()):
                break
        return out[:, 1:]


def epoch_batches(lengths: torch.Tensor, batch: int, batching: str) -> list[list[int]]:
    """One epoch's batches of pair indices in a fresh random order: random pairs, or ("bucket") pairs of similar
    length, cut from runs of 50 batches' worth of pairs sorted by `lengths` (N,), the batches then shuffled."""
    order = torch.randperm(len(lengths))
    if batching == "bucket":
        runs = order.split(50 * batch)
        order = torch.cat([run[lengths[run].argsort(stable=True)] for run in runs])
    batches = [b.tolist() for b in order.split(batch) if len(b) == batch]
    return [batches[i] for i in torch.randperm(len(batches)).tolist()] if batching == "bucket" else batches


def pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(map(len, rows))
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


def run(
    task: str = "bible-basic",
    split: str = "test",
    minutes: float = 14.0,
    seed: int = 0,
    precision: str = "fp32",
    data_dir: str | None = None,
    eval_file: Path | None = None,
    batching: str = "bucket",
) -> dict:
    """Train the reference for `minutes` of wall time on `task`'s training split and decode `split` (or the jsonl
    `eval_file`) greedily: its figures, the copy's, and the outputs (keys hyps, refs, sources)."""
    torch.manual_seed(seed)
    train = load_split(task, "train", data_dir)
    columns = train[:]
    vocab = tok.train(columns["src"] + columns["trg"], 8000, "bpe")
    src_ids, trg_ids = vocab.encode(columns["src"]), vocab.encode(columns["trg"])
    bos, eos, padding = vocab.cls, vocab.sep, vocab.pad
    model = Seq2Seq(vocab.size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss(ignore_index=padding, label_smoothing=0.1)
    precision = resolve_precision(precision, torch.device("cpu"))
    budget, start, step = minutes * 60, time.perf_counter(), 0
    lengths = torch.tensor([len(a) + len(b) for a, b in zip(src_ids, trg_ids)])
    batches: list[list[int]] = []
    while (elapsed := time.perf_counter() - start) < budget:
        lr = 1e-3 * min((step + 1) / 200, max(0.0, 1 - elapsed / budget))
        for group in opt.param_groups:
            group["lr"] = lr
        if not batches:  # a fresh order every epoch
            batches = epoch_batches(lengths, 32, batching)
        rows = batches.pop()
        src = pad([src_ids[i] for i in rows], padding)
        trg = pad([[bos] + trg_ids[i] + [eos] for i in rows], padding)
        with autocast(torch.device("cpu"), precision):
            logits = model(src, trg[:, :-1], src == padding, trg[:, :-1] == padding)
            loss = loss_fn(logits.float().reshape(-1, logits.shape[-1]), trg[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
    train_minutes = (time.perf_counter() - start) / 60
    test = read_inputs(eval_file) if eval_file else load_eval_split(task, split, data_dir)
    refs = references(test)
    model.eval()
    hyps, t0 = [], time.perf_counter()
    sources = vocab.encode(list(test["src"]))
    for i in range(0, len(sources), 64):
        src = pad(sources[i : i + 64], padding)
        with autocast(torch.device("cpu"), precision):
            out = model.greedy(src, src == padding, bos, eos, max_len=src.shape[1] + 16)
        hyps += vocab.decode([[t for t in row if t != eos] for row in out.tolist()])
    seconds = time.perf_counter() - t0
    ours, copy = metrics.score(hyps, refs), metrics.score(list(test["src"]), refs)
    return {
        "steps": step,
        "train_minutes": round(train_minutes, 2),
        "precision": precision,
        "seed": seed,
        "batching": batching,
        "parameters": sum(p.numel() for p in model.parameters()),
        "sentences_per_s": len(hyps) / seconds,
        "sacrebleu": ours["sacrebleu"],
        "sentence_bleu": ours["sentence_bleu"],
        "copy_sacrebleu": copy["sacrebleu"],
        "copy_sentence_bleu": copy["sentence_bleu"],
        "hyps": hyps,
        "refs": refs,
        "sources": list(test["src"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="bible-basic")
    ap.add_argument("--split", default="test")
    ap.add_argument("--eval", type=Path, default=None, help="a jsonl of {src, trg|refs} to score instead of a split")
    ap.add_argument("--minutes", type=float, default=14.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", default="fp32")  # bf16 autocast measured slower for this model here (0.34 against 0.25 s a step)
    ap.add_argument("--batching", choices=["bucket", "random"], default="bucket", help="pairs of similar length, or random pairs")
    args = ap.parse_args()
    r = run(args.task, args.split, args.minutes, args.seed, args.precision, eval_file=args.eval, batching=args.batching)
    print(json.dumps({k: v for k, v in r.items() if k not in ("hyps", "refs", "sources")}))
    print(f"| system | steps | sacreBLEU ({args.task} {args.eval.name if args.eval else args.split}) | sentence BLEU | sentences/s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print(
        f"| autoregressive, {r['train_minutes']:.1f} min | {r['steps']} | {r['sacrebleu']:.2f} | {r['sentence_bleu']:.4f} | "
        f"{r['sentences_per_s']:.1f} |"
    )
    print(f"| copy the source | - | {r['copy_sacrebleu']:.2f} | {r['copy_sentence_bleu']:.4f} | - |")
    for s, h, ref in list(zip(r["sources"], r["hyps"], r["refs"]))[:5]:
        print(f"\nsource    {s}\noutput    {h}\nreference {ref[0]}")


if __name__ == "__main__":
    main()
