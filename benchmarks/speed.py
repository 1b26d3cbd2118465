"""Speed benchmark: how close diffutext runs to this machine's own limits, in one run.

Measures, on the current machine and device:
  1. the matrix-product peak, GFLOP/s per precision (torch.mm on square matrices, best of a few);
  2. training: seconds per optimizer step, tokens/s and model FLOPs utilisation (MFU) against that
     peak, for bench-small (benchmarks/configs/bench-small.toml), `small` and `base`, fp32 and bf16,
     and the loss curves of the fp32 and bf16 runs side by side;
  3. sampling at bench-small: per-step time and sentences/s for every sampler, fp32 and bf16, and
     the loop's per-step overhead over a bare model forward;
  4. peak memory (RSS): `base` training at batch 64, sequence 128 (two steps, so that the second
     holds the optimizer state); decoding 8× more inputs;
and prints each figure beside the target (DiffuSeq's own code on a 190 GFLOP/s machine,
scaled by the measured fp32 peak / 190). Timings share the machine with whatever else runs:
the load average is printed before and after, and figures taken under load are not comparable.

    python benchmarks/speed.py            # the full run (several minutes on 2 CPU cores)
    python benchmarks/speed.py --quick    # under a minute: 1 timed step each, base at batch 4, no base RSS
    python benchmarks/speed.py --compile  # also times torch.compile on bench-small

Model FLOPs per token, forward + backward: 6 × (every Linear weight + the tied head V × D) +
12 × layers × width × seq_len (attention scores and values). The embedding lookup, norms, biases,
softmax and the optimizer count for nothing: MFU is the fraction of the peak spent on model math.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffutext.allocator import limit_heap_fragmentation  # noqa: E402
from diffutext.config import PRESETS, ModelConfig, load_toml, resolve  # noqa: E402
from diffutext.data.batches import held_end  # noqa: E402
from diffutext.device import autocast  # noqa: E402
from diffutext.diffusion import alpha_bar_table  # noqa: E402
from diffutext.losses import draw_noise  # noqa: E402
from diffutext.model import Denoiser, conditioning  # noqa: E402
from diffutext.samplers import Sampler, ddpm_update, denoise, make_sampler  # noqa: E402
from diffutext.trainer import Objective, ema_update  # noqa: E402

BERT_VOCAB = 30522
REFERENCE_PEAK = 190.0  # GFLOP/s, fp32, of the machine DiffuSeq was timed on
DIFFUSEQ = {"train_step_s": 5.27, "sample_step_s": 2.59, "sample_overhead": 2.59 / 1.14}
TARGETS = {
    "train_fp32_s": 3.2,
    "train_bf16_s": 1.85,
    "sample_fp32_s": 1.55,
    "overhead": 1.2,
    "mfu_base": 0.55,
    "bf16_speedup": 1.5,
    "loss_rel": 0.02,
    "base_rss_gb": 6.0,
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load() -> float:
    return os.getloadavg()[0]


# ---------------------------------------------------------------- peak


def matmul_peak(device: torch.device, dtype: torch.dtype, quick: bool) -> float:
    best = 0.0
    for n in [2048] if quick else [1024, 2048, 4096]:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b
        for _ in range(2 if quick else 4):
            sync(device)
            t0 = time.perf_counter()
            a @ b
            sync(device)
            best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return best


# ---------------------------------------------------------------- models


def bench_small() -> ModelConfig:
    data = load_toml(ROOT / "benchmarks" / "configs" / "bench-small.toml")
    return dataclasses.replace(resolve(data.pop("preset"), data).model, vocab_size=BERT_VOCAB)


def preset_model(name: str, vocab: int) -> ModelConfig:
    """A preset's model at this vocabulary; a copy prior left to auto is timed off (translation's choice)."""
    model = PRESETS[name].model if name in PRESETS else PREVIOUS_SMALL
    copy = {"copy_source": "off"} if model.copy_source == "auto" else {}
    return dataclasses.replace(model, vocab_size=vocab, **copy)


# The small preset of diffutext 0.1 before the classifier (README, "Choosing the defaults"): DiffuSeq's regression
# with the copy prior and its lexicon on a 4-layer joint network, timed beside the current one.
PREVIOUS_SMALL = ModelConfig(
    hidden_dim=32, width=256, layers=4, heads=4, ffn=1024, dropout=0.0, seq_len=56, time_dim=128, copy_source="on", copy_lexicon=0.15
)


def make_model(cfg: ModelConfig, device: torch.device) -> Denoiser:
    return Denoiser(cfg, alpha_bar_table("sqrt", 2000)).to(device)


def conditions(model: Denoiser, ids: torch.Tensor, mask: torch.Tensor) -> tuple[dict, torch.Tensor | None]:
    """What the model reads besides z_t and t on a synthetic batch, and the held positions of a length head's
    (the last target position: the synthetic target has no padding)."""
    hold = held_end(ids, mask, 0) if model.config.needs_hold else None
    return conditioning(model, ids, mask, hold), hold


def flops_per_token(model: Denoiser) -> float:
    c = model.config
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return 6.0 * (linear + c.vocab_size * c.hidden_dim) + 12.0 * c.layers * c.width * c.seq_len


def synthetic_batch(cfg: ModelConfig, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids (the cost does not depend on them); the target side is the second half, about
    what bible-basic's [CLS] src [SEP] trg [SEP] + padding gives at these lengths."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, cfg.vocab_size, (batch, cfg.seq_len), generator=g)
    mask = torch.zeros(batch, cfg.seq_len, dtype=torch.bool)
    mask[:, cfg.seq_len // 2 :] = True
    return ids, mask


# ---------------------------------------------------------------- training


def train_bench(
    cfg: ModelConfig, batch: int, precision: str, steps: int, device: torch.device, compile: bool = False, warmup: int = 1
) -> dict:
    """The training step of diffutext.train (objective, backward, clipping, fused AdamW, EMA) on a fixed batch,
    with the allocator setting train() makes on CPU."""
    if device.type == "cpu":
        limit_heap_fragmentation()
    torch.manual_seed(0)
    model = make_model(cfg, device)
    ema = copy.deepcopy(model).requires_grad_(False)
    objective = Objective(model, compile)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    alpha_bar = alpha_bar_table("sqrt", 2000).float().to(device)
    ids, mask = (x.to(device) for x in synthetic_batch(cfg, batch))
    _, hold = conditions(model, ids, mask)
    gen = torch.Generator(device=device).manual_seed(0)
    times, losses, first = [], [], None
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        t = torch.randint(0, 2000, (batch,), generator=gen, device=device)
        noise = draw_noise((batch, cfg.seq_len, cfg.hidden_dim), False, gen, device, self_condition=cfg.self_condition > 0)
        opt.zero_grad(set_to_none=True)
        with autocast(device, precision):
            loss = objective(ids, mask, t, noise, alpha_bar, 0.0, None, "forward", hold)["loss"].mean()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        ema_update(ema, model, 0.999)
        losses.append(loss.item())  # the one sync of the step
        dt = time.perf_counter() - t0
        if i == 0:
            first = dt
        if i >= warmup:
            times.append(dt)
    step_s = sorted(times)[len(times) // 2]  # median
    tokens = batch * cfg.seq_len
    return {
        "step_s": step_s,
        "first_step_s": first,
        "tokens_per_s": tokens / step_s,
        "gflops": flops_per_token(model) * tokens / step_s / 1e9,
        "losses": losses,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
    }


# ---------------------------------------------------------------- sampling


def _prefix_of_full(T: int, n: int) -> torch.Tensor:
    return torch.arange(T - 1, T - 1 - n, -1)


def sample_bench(
    cfg: ModelConfig,
    batch: int,
    precision: str,
    steps: int,
    device: torch.device,
    samplers: tuple[str, ...] = ("ddpm", "uniform", "skip", "ddim", "ads"),
) -> dict:
    torch.manual_seed(0)
    model = make_model(cfg, device).eval()
    alpha_bar = alpha_bar_table("sqrt", 2000).float().to(device)
    ids, mask = (x.to(device) for x in synthetic_batch(cfg, batch))
    cond, hold = conditions(model, ids, mask)
    z = torch.randn(batch, cfg.seq_len, cfg.hidden_dim, device=device)
    t = torch.full((batch,), 1000, device=device)
    with torch.inference_mode():
        with autocast(device, precision):
            model(z, t, **cond)
        fwd = []
        for _ in range(steps):
            sync(device)
            t0 = time.perf_counter()
            with autocast(device, precision):
                model(z, t, **cond).float()
            sync(device)
            fwd.append(time.perf_counter() - t0)
    forward_s = sorted(fwd)[len(fwd) // 2]
    out = {"forward_s": forward_s, "samplers": {}}
    g = torch.Generator(device=device)
    for name in samplers:
        # ddpm visits all T: time a prefix of its schedule and extrapolate
        sampler = Sampler(_prefix_of_full, ddpm_update, respaced=False) if name == "ddpm" else make_sampler(name)
        n = max(steps, 3) if name == "ads" else steps  # ADS needs 3 steps at least
        sync(device)
        t0 = time.perf_counter()
        denoise(model, alpha_bar, sampler, n, ids, mask, generator=g.manual_seed(0), precision=precision, hold=hold)
        sync(device)
        per_step = (time.perf_counter() - t0) / n
        nominal = 2000 if name == "ddpm" else 20
        out["samplers"][name] = {"step_s": per_step, "nominal_steps": nominal, "sentences_per_s": batch / (per_step * nominal)}
    per_step = sorted(s["step_s"] for s in out["samplers"].values())
    loop = per_step[len(per_step) // 2]  # the median sampler
    out["step_s"] = loop
    out["overhead"] = loop / forward_s
    return out


# ---------------------------------------------------------------- memory (each in a fresh process)


def rss_child(kind: str, arg: int) -> None:
    torch.manual_seed(0)
    if kind == "train-base":  # two steps: the second runs with the optimizer state in memory, as every later one does
        cfg = preset_model("base", BERT_VOCAB)
        train_bench(cfg, arg, "fp32", 1, torch.device("cpu"), warmup=1)
    elif kind == "decode":
        from types import SimpleNamespace

        import datasets

        from diffutext.config import RunConfig, SampleConfig
        from diffutext.data.tokenizer import train_bpe
        from diffutext.evaluate import Loaded, decode

        words = [f"w{i}" for i in range(400)]
        vocab = train_bpe([" ".join(words[i : i + 9]) for i in range(0, 390, 3)] * 4, 300)
        cfg = ModelConfig(vocab_size=vocab.size, hidden_dim=16, width=64, layers=2, heads=2, ffn=128, dropout=0.0, seq_len=48)
        model = Denoiser(cfg).eval()
        ck = SimpleNamespace(vocab=vocab, config=RunConfig(model=cfg))
        ds = datasets.Dataset.from_dict({"src": [" ".join(words[i % 390 : i % 390 + 8]) for i in range(arg)], "trg": [""] * arg})
        loaded = Loaded(ck, model, alpha_bar_table("sqrt", 2000).float(), torch.device("cpu"))
        decode(loaded, ds, SampleConfig(sampler="ads", steps=3, batch_size=64))
    print(json.dumps({"max_rss_gb": peak_rss_gb()}))


def peak_rss_gb() -> float:
    """This process image's peak RSS: VmHWM (ru_maxrss would include the parent's size at fork)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1e6  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def rss(kind: str, arg: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--_rss", kind, str(arg)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["max_rss_gb"]


# ---------------------------------------------------------------- report


def mark(ok: bool) -> str:
    return "yes" if ok else "**no**"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="under a minute: 1 timed step each, base at batch 4, no base RSS")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile on bench-small")
    ap.add_argument("--json", type=Path, help="write every figure to this file")
    ap.add_argument("--_rss", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # each table row as soon as it is measured
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._rss:
        rss_child(args._rss[0], int(args._rss[1]))
        return
    device = torch.device(args.device)
    q = args.quick
    started = time.perf_counter()
    res: dict = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "load_before": load(),
        }
    }
    print(f"# diffutext speed benchmark{' (--quick)' if q else ''}\n")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, load average {load():.2f}\n")

    # 1. peak
    precisions = ["fp32", "bf16"] + (["fp16"] if device.type == "cuda" else [])
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    peak = {p: matmul_peak(device, dtypes[p], q) for p in precisions}
    res["peak_gflops"] = peak
    scale = REFERENCE_PEAK / peak["fp32"]
    print("## matrix-product peak\n\n| precision | GFLOP/s |\n| --- | ---: |")
    for p in precisions:
        print(f"| {p} | {peak[p]:.0f} |")
    print(f"\ntargets below are scaled by {REFERENCE_PEAK:.0f} / {peak['fp32']:.0f} = {scale:.2f}\n")

    # 2. training
    small_cfg = bench_small()
    runs = [
        ("bench-small", small_cfg, 64, 1 if q else 5),
        ("small", preset_model("small", 8000), 32, 1 if q else 5),
        ("small (0.1)", preset_model("small (0.1)", 8000), 32, 1 if q else 5),
        ("base", preset_model("base", BERT_VOCAB), 4 if q else 64, 1 if q else 2),
    ]
    res["train"] = {}
    print("## training (one optimizer step: forward, backward, clip, fused AdamW, EMA)\n")
    print("| config | params | batch × seq | precision | s / step | tokens / s | GFLOP/s | MFU | bf16 speed-up |")
    print("| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for name, cfg, batch, steps in runs:
        res["train"][name] = {}
        for p in ("fp32", "bf16"):
            r = train_bench(cfg, batch, p, steps, device)
            r["mfu"] = r["gflops"] / peak[p]
            res["train"][name][p] = r
            speed = f"{res['train'][name]['fp32']['step_s'] / r['step_s']:.2f}×" if p == "bf16" else ""
            print(
                f"| {name} | {r['params_m']:.1f}M | {batch} × {cfg.seq_len} | {p} | {r['step_s']:.2f} | {r['tokens_per_s']:.0f} | "
                f"{r['gflops']:.0f} | {r['mfu']:.0%} | {speed} |",
                flush=True,
            )
    bs = res["train"]["bench-small"]
    curve = [abs(b - a) / abs(a) for a, b in zip(bs["fp32"]["losses"], bs["bf16"]["losses"])]
    res["loss_curve_max_rel_diff"] = max(curve)
    print(f"\nbench-small loss per step, fp32: {', '.join(f'{x:.4f}' for x in bs['fp32']['losses'])}")
    print(
        f"bench-small loss per step, bf16: {', '.join(f'{x:.4f}' for x in bs['bf16']['losses'])}  (largest relative difference {max(curve):.2%})\n"
    )
    if args.compile:
        r = train_bench(small_cfg, 64, "fp32", 3, device, compile=True, warmup=2)
        res["train"]["bench-small"]["fp32-compile"] = r
        print(
            f"torch.compile, bench-small fp32: first step {r['first_step_s']:.1f} s, then {r['step_s']:.2f} s / step "
            f"({bs['fp32']['step_s'] / r['step_s']:.2f}× eager)\n"
        )

    # 3. sampling
    res["sample"] = {}
    print("## sampling at bench-small, batch 64 (per denoising step; sentences/s at 20 steps, ddpm at 2000)\n")
    names = ("ddpm", "uniform", "skip", "ddim", "ads")
    print("| precision | bare forward s | " + " | ".join(f"{n} s/step (sent/s)" for n in names) + " | loop / forward |")
    print("| --- | ---: |" + " ---: |" * 5 + " ---: |")
    for p in ("fp32", "bf16"):
        r = sample_bench(small_cfg, 64, p, 2 if q else 6, device, names if (p == "fp32" or not q) else ("ads",))
        res["sample"][p] = r
        cells = " | ".join(
            f"{r['samplers'][n]['step_s']:.3f} ({r['samplers'][n]['sentences_per_s']:.2f})" if n in r["samplers"] else "-" for n in names
        )
        print(f"| {p} | {r['forward_s']:.3f} | {cells} | {r['overhead']:.2f}× |", flush=True)
    print(f"\nbf16 sampling step: {res['sample']['fp32']['step_s'] / res['sample']['bf16']['step_s']:.2f}× the speed of fp32\n")
    print("## the small preset against the previous one (batch 128, fp32; training: batch 32)\n")
    print("| preset | training tokens / s | ADS-20 sentences / s |\n| --- | ---: | ---: |")
    for name in ("small", "small (0.1)"):
        r = sample_bench(preset_model(name, 8000), 128, "fp32", 2, device, ("ads",))
        res["sample"][name] = r
        print(f"| {name} | {res['train'][name]['fp32']['tokens_per_s']:.0f} | {r['samplers']['ads']['sentences_per_s']:.1f} |", flush=True)
    print()

    # 4. memory
    res["rss_gb"] = {}
    if not q:
        res["rss_gb"]["base_train_b64_s128"] = rss("train-base", 64)
    res["rss_gb"]["decode_256"] = rss("decode", 256)
    res["rss_gb"]["decode_2048"] = rss("decode", 2048)  # 8× the inputs
    print("## peak memory (RSS, fresh process each)\n")
    if "base_train_b64_s128" in res["rss_gb"]:
        print(f"- base training, batch 64 × seq 128, fp32: {res['rss_gb']['base_train_b64_s128']:.2f} GB")
    print(
        f"- decoding 256 vs 2048 inputs (tiny model, batch 64): {res['rss_gb']['decode_256']:.3f} vs {res['rss_gb']['decode_2048']:.3f} GB\n"
    )

    # the acceptance targets
    t32, t16 = bs["fp32"]["step_s"], bs["bf16"]["step_s"]
    s32 = res["sample"]["fp32"]
    base = res["train"]["base"]["fp32"]
    rows = [
        (
            "bench-small train step, fp32",
            f"{t32:.2f} s",
            f"≤ {TARGETS['train_fp32_s'] * scale:.2f} s",
            f"{DIFFUSEQ['train_step_s']:.2f} s",
            f"{t32 / DIFFUSEQ['train_step_s'] / scale:.2f}×",
            t32 <= TARGETS["train_fp32_s"] * scale,
        ),
        (
            "bench-small train step, bf16",
            f"{t16:.2f} s",
            f"≤ {TARGETS['train_bf16_s'] * scale:.2f} s",
            f"{DIFFUSEQ['train_step_s']:.2f} s",
            f"{t16 / DIFFUSEQ['train_step_s'] / scale:.2f}×",
            t16 <= TARGETS["train_bf16_s"] * scale,
        ),
        (
            "bench-small sample step, batch 64, fp32",
            f"{s32['step_s']:.2f} s",
            f"≤ {TARGETS['sample_fp32_s'] * scale:.2f} s",
            f"{DIFFUSEQ['sample_step_s']:.2f} s",
            f"{s32['step_s'] / DIFFUSEQ['sample_step_s'] / scale:.2f}×",
            s32["step_s"] <= TARGETS["sample_fp32_s"] * scale,
        ),
        (
            "sampling loop / bare forward, fp32",
            f"{s32['overhead']:.2f}×",
            f"≤ {TARGETS['overhead']:.1f}×",
            f"{DIFFUSEQ['sample_overhead']:.2f}×",
            "",
            s32["overhead"] <= TARGETS["overhead"],
        ),
        (
            f"base train MFU, fp32{' (batch 4: --quick)' if q else ''}",
            f"{base['mfu']:.0%}",
            f"≥ {TARGETS['mfu_base']:.0%}",
            "57–62% (bench-small)",
            "",
            base["mfu"] >= TARGETS["mfu_base"],
        ),
        (
            "bf16 / fp32 training speed (bench-small)",
            f"{t32 / t16:.2f}×",
            f"≥ {TARGETS['bf16_speedup']:.1f}×",
            "",
            "",
            t32 / t16 >= TARGETS["bf16_speedup"],
        ),
        ("bf16 loss curve vs fp32", f"{max(curve):.2%}", f"≤ {TARGETS['loss_rel']:.0%}", "", "", max(curve) <= TARGETS["loss_rel"]),
    ]
    if "base_train_b64_s128" in res["rss_gb"]:
        gb = res["rss_gb"]["base_train_b64_s128"]
        rows.append(
            (
                "base train peak RSS, batch 64 × seq 128",
                f"{gb:.2f} GB",
                f"< {TARGETS['base_rss_gb']:.0f} GB",
                "4.7 GB (bench-small)",
                "",
                gb < TARGETS["base_rss_gb"],
            )
        )
    growth = res["rss_gb"]["decode_2048"] / res["rss_gb"]["decode_256"]
    rows.append(("decode RSS, 8× the inputs", f"{growth:.2f}×", "≈ 1×", "", "", growth < 1.1))
    res["acceptance"] = [
        {"figure": r[0], "measured": r[1], "target": r[2], "diffuseq": r[3], "vs_diffuseq": r[4], "met": r[5]} for r in rows
    ]
    print("## against the targets\n")
    print("| figure | measured | target | DiffuSeq | vs DiffuSeq (scaled) | met |\n| --- | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {mark(r[5])} |")
    res["machine"]["load_after"] = load()
    res["seconds"] = time.perf_counter() - started
    print(
        f"\nload average before {res['machine']['load_before']:.2f}, after {res['machine']['load_after']:.2f}; "
        f"{res['seconds']:.0f} s in all"
    )
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
