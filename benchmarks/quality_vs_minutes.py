"""The learning curve: sacreBLEU and optimizer steps against training minutes, for a diffutext preset and for the
autoregressive reference (`autoregressive.py`) trained as long on the same task and CPU, side by side; a table,
a JSON file and a PNG.

    python benchmarks/quality_vs_minutes.py                                   # bible-basic test, 2/5/14/45 minutes
    python benchmarks/quality_vs_minutes.py --task ../shared/data/multi30k/de2en \\
        --eval ../shared/data/multi30k/de2en/test_2016_flickr.jsonl --minutes 2 5 14

Each budget is a separate run whose learning rate decays to zero at its own budget (`--max-minutes`), as a user
would train for that long; the diffusion runs decode with ADS-20 (`--steps`). One training job runs at a time.
Runs and reference results already under --out are reused, so the table can be rebuilt without retraining.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import autoregressive  # noqa: E402

from diffutext import metrics  # noqa: E402
from diffutext.checkpoint import list_checkpoints  # noqa: E402
from diffutext.config import SampleConfig, resolve  # noqa: E402
from diffutext.data.tasks import load_eval_split, read_inputs, references  # noqa: E402
from diffutext.evaluate import decode, load_model  # noqa: E402
from diffutext.plots import _pyplot  # noqa: E402


def diffusion_row(preset: str, task: str, minutes: float, seed: int, out: Path, dataset, refs, steps: int) -> dict:
    run = out / f"{preset}-{minutes:g}min-seed{seed}"
    if not list_checkpoints(run):
        cfg = resolve(preset, {"train": {"task": task, "max_minutes": minutes, "max_steps": 10**9, "seed": seed}})
        from diffutext.train import train

        start = time.perf_counter()
        train(cfg, run)
        print(f"trained {run} in {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    loaded = load_model(run)
    decoded = decode(loaded, dataset, SampleConfig(sampler="ads", steps=steps, batch_size=128))
    s = metrics.score(decoded.hyps, refs)
    return {
        "system": f"diffutext {preset}, ADS-{steps}",
        "minutes": minutes,
        "steps": loaded.checkpoint.step,
        "sacrebleu": s["sacrebleu"],
        "sentence_bleu": s["sentence_bleu"],
        "sentences_per_s": len(decoded.hyps) / decoded.seconds,
    }


def reference_row(task: str, split: str, minutes: float, seed: int, out: Path, eval_file: Path | None) -> dict:
    cached = out / f"autoregressive-{minutes:g}min-seed{seed}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    r = autoregressive.run(task, split, minutes, seed, eval_file=eval_file)
    row = {
        "system": "autoregressive, greedy",
        "minutes": minutes,
        "steps": r["steps"],
        "sacrebleu": r["sacrebleu"],
        "sentence_bleu": r["sentence_bleu"],
        "sentences_per_s": r["sentences_per_s"],
    }
    out.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(row))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--task", default="bible-basic")
    ap.add_argument("--split", default="test", help="the task's split to score (unless --eval)")
    ap.add_argument("--eval", type=Path, default=None, help="a jsonl of {src, trg|refs} to score instead of a split")
    ap.add_argument("--minutes", type=float, nargs="+", default=[2, 5, 14, 45])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=20, help="ADS steps")
    ap.add_argument("--no-reference", action="store_true", help="skip the autoregressive reference")
    ap.add_argument("--out", type=Path, default=Path("runs/quality-vs-minutes"))
    args = ap.parse_args()

    dataset = read_inputs(args.eval) if args.eval else load_eval_split(args.task, args.split)
    refs = references(dataset)
    copy = metrics.score(list(dataset["src"]), refs)
    rows = []
    for minutes in args.minutes:
        rows.append(diffusion_row(args.preset, args.task, minutes, args.seed, args.out, dataset, refs, args.steps))
        print(json.dumps(rows[-1]), flush=True)
        if not args.no_reference:
            rows.append(reference_row(args.task, args.split, minutes, args.seed, args.out, args.eval))
            print(json.dumps(rows[-1]), flush=True)

    where = args.eval.name if args.eval else f"{args.split} split"
    print(f"\n{args.task}, {where} ({len(dataset)} sentences), seed {args.seed}")
    print("| training minutes | system | optimizer steps | sacreBLEU | sentence BLEU | sentences/s |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['minutes']:g} | {r['system']} | {r['steps']} | {r['sacrebleu']:.2f} | {r['sentence_bleu']:.4f} | "
            f"{r['sentences_per_s']:.1f} |"
        )
    print(f"| - | copy the source | - | {copy['sacrebleu']:.2f} | {copy['sentence_bleu']:.4f} | - |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "curve.json").write_text(json.dumps({"task": args.task, "eval": where, "copy": copy["sacrebleu"], "rows": rows}, indent=1))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for system in dict.fromkeys(r["system"] for r in rows):
        mine = [r for r in rows if r["system"] == system]
        ax.plot([r["minutes"] for r in mine], [r["sacrebleu"] for r in mine], marker="o", label=system)
    ax.axhline(copy["sacrebleu"], color="grey", linestyle=":", label="copy the source")
    ax.set_xscale("log")
    budgets = sorted({r["minutes"] for r in rows})
    ax.set_xticks(budgets, [f"{m:g}" for m in budgets])  # the budgets themselves, not powers of ten
    ax.minorticks_off()
    ax.set_xlabel("training minutes (2 CPU cores)")
    ax.set_ylabel(f"sacreBLEU ({where})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "curve.png", dpi=120)
    print(f"wrote {args.out / 'curve.json'} and {args.out / 'curve.png'}")


if __name__ == "__main__":
    main()
