"""Quality per CPU-minute: train a preset for several wall-time budgets, decode the test split with
ADS-20 and print sacreBLEU (and DiffuSeq's sentence BLEU) against minutes, side by side.

    python benchmarks/quality_vs_minutes.py                      # small preset, 5/15/45 minutes, bible-basic
    python benchmarks/quality_vs_minutes.py --minutes 5 15 --task bible-modern --out runs/qvm

Each budget is a separate run whose learning rate decays to zero at its own budget
(`--max-minutes`), which is how a user would train for that long. Runs that already exist under
--out are reused, so the table can be rebuilt without retraining.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from diffutext import metrics
from diffutext.checkpoint import list_checkpoints
from diffutext.config import SampleConfig, resolve
from diffutext.data.tasks import load_eval_split, references
from diffutext.evaluate import decode, load_model
from diffutext.train import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--task", default="bible-basic")
    ap.add_argument("--minutes", type=float, nargs="+", default=[5, 15, 45])
    ap.add_argument("--out", type=Path, default=Path("runs/quality-vs-minutes"))
    ap.add_argument("--steps", type=int, default=20, help="ADS steps")
    args = ap.parse_args()

    test = load_eval_split(args.task, "test")
    refs = references(test)
    copy = metrics.score(list(test["src"]), refs)
    rows = []
    for minutes in args.minutes:
        run = args.out / f"{args.preset}-{minutes:g}min"
        if not list_checkpoints(run):
            cfg = resolve(args.preset, {"train": {"task": args.task, "max_minutes": minutes, "max_steps": 10**9}})
            start = time.perf_counter()
            train(cfg, run)
            print(f"trained {run} in {(time.perf_counter() - start) / 60:.1f} min", flush=True)
        loaded = load_model(run)
        out = decode(loaded, test, SampleConfig(sampler="ads", steps=args.steps, batch_size=128))
        s = metrics.score(out.hyps, refs)
        rows.append({"minutes": minutes, "steps": loaded.checkpoint.step, **s, "decode_s": out.seconds})
        print(json.dumps(rows[-1]), flush=True)

    print(f"\n{args.task} test split ({len(test)} sentences), {args.preset} preset, ADS-{args.steps}, EMA weights")
    print(f"| training minutes | optimizer steps | sacreBLEU | sentence BLEU (DiffuSeq) | ROUGE-L |")
    print(f"| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['minutes']:g} | {r['steps']} | {r['sacrebleu']:.2f} | {r['sentence_bleu']:.4f} | {r['rouge_l']:.4f} |")
    print(f"| copy the source | - | {copy['sacrebleu']:.2f} | {copy['sentence_bleu']:.4f} | {copy['rouge_l']:.4f} |")


if __name__ == "__main__":
    main()
