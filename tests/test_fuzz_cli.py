"""Fuzzed command line: random flag values and random file contents fed to every command
through CliRunner. The only outcomes allowed are success (exit 0) or exit 2 with one `error:` line and
no traceback. Values that would make a run slow (many steps, long decodes) are kept small; hypothesis is
derandomized so CI sees the same examples every time. The four hypothesis sweeps are marked `slow` (run by
`python -m pytest -m slow`); every numeric flag and config field at its edges, and the inputs the fuzzing
found, run in the default `python -m pytest`."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import assert_one_line_error, invoke


def SETTINGS(n: int):
    """A broad sweep of n derandomized examples, in the slow set."""
    sweep = settings(max_examples=n, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    return lambda test: pytest.mark.slow(sweep(test))


# ---------------------------------------------------------------- value strategies

junk = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=24)
specials = st.sampled_from(
    [
        "",
        " ",
        "-",
        "--",
        "nan",
        "inf",
        "-inf",
        "1e309",
        "0x10",
        "1_000",
        "٣",
        "-0",
        "1.5",
        "true",
        "9" * 30,
        "-9" * 20,
        "../..",
        "/",
        "\n",
        "é",
        "🙂",
    ]
)


def mostly(valid, *bad):
    """Two in three draws valid, so that examples get past the option parser into the engine."""
    return st.one_of(valid, valid, st.one_of(*bad) if bad else st.one_of(specials, junk))


# numbers that parse but sit at the edges: where overflows, divisions by zero and hangs live
edge_ints = st.sampled_from([0, -1, 1, 2, 3, 2**31, 2**32, 2**63, 2**64, 10**12, 10**30, -(2**63) - 1, -(10**30)]).map(str)
edge_floats = st.sampled_from(["nan", "inf", "-inf", "0", "-0.0", "1e-300", "1e308", "-1e308", "5e-324"])


def ints(lo: int, hi: int):
    return mostly(st.integers(lo, hi).map(str), edge_ints, edge_ints, st.integers().map(str), specials, junk)


def floats(lo: float, hi: float):
    return mostly(st.floats(lo, hi).map(repr), edge_floats, edge_floats, st.floats().map(repr), specials, junk)


def small(lo: int, hi: int):
    """For counts whose large values are valid but slow (steps to train, sentences, seeds to decode)."""
    return mostly(st.integers(lo, hi).map(str), specials, junk)


def choice(*valid: str):
    return mostly(st.sampled_from(valid))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**20), 10**20) | st.floats() | junk,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(junk, inner, max_size=3),
    max_leaves=8,
)
jsonl_lines = st.lists(
    st.one_of(
        st.dictionaries(st.sampled_from(["src", "trg", "hyp", "refs", "x"]), json_values, max_size=4).map(json.dumps),
        st.fixed_dictionaries({"src": junk, "trg": junk, "hyp": junk}).map(json.dumps),
        json_values.map(json.dumps),
        junk,
    ),
    max_size=5,
).map("\n".join)
file_bytes = st.one_of(st.binary(max_size=300), jsonl_lines.map(str.encode), junk.map(str.encode), st.just(b""))
toml_text = st.one_of(
    junk,
    st.builds(
        lambda section, key, value: f"[{section}]\n{key} = {value}\n",
        st.sampled_from(["model", "diffusion", "train", "nope", "model.x"]),
        st.sampled_from(
            [
                "width",
                "heads",
                "layers",
                "seq_len",
                "hidden_dim",
                "dropout",
                "time_dim",
                "T",
                "schedule",
                "lr",
                "batch_size",
                "max_steps",
                "warmup_steps",
                "ema_decay",
                "precision",
                "eval_every",
                "log_every",
                "save_every",
                "vocab_size",
                "seed",
                "grad_clip",
                "max_minutes",
                "unknown",
            ]
        ),
        st.one_of(
            st.integers(-4, 64).map(str),
            edge_ints,
            st.sampled_from(["nan", "inf", "-inf", '"x"', "true", "[1]", "{a=1}", "0.5", "-0.5", "1e400", "9" * 25]),
        ),
    ),
    st.just('preset = "huge"\n'),
    st.just("preset = 3\n"),
)


# ---------------------------------------------------------------- a workspace of files the flags point at


@pytest.fixture(scope="module")
def ws(tiny_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    from diffutext.data.tasks import embedded_pairs

    task = root / "task"
    task.mkdir()
    for split, n in (("train", 64), ("valid", 8), ("test", 8)):
        (task / f"{split}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in embedded_pairs("bible-basic", split)[:n]))
    run = root / "run"
    shutil.copytree(tiny_run, run)  # read-only for sampling; never an --out
    return {"root": root, "task": task, "run": run, "n": itertools.count()}


def fresh(ws) -> Path:
    folder = ws["root"] / f"ex{next(ws['n'])}"
    folder.mkdir()
    return folder


def write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


def check(result) -> None:
    """Exit 0, or exit 2 with one line. The one designed exit 1: finite but absurd hyperparameters (--lr 1e308)
    that train into a NaN get the NaN line (after torch's forward trace under --detect-anomaly)."""
    if result.exit_code == 0:
        assert result.exception is None, repr(result.exception)
        return
    last = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
    if result.exit_code == 1 and ("non-finite loss" in last or "autograd anomaly" in last):
        assert isinstance(result.exception, SystemExit) and last.startswith("error: ")
        if "autograd anomaly" not in last:
            assert_one_line_error(result, code=1, alone=False)
        return
    assert_one_line_error(result, alone=False)  # a run may print progress or a warning before it meets the problem


def options(draw, table: dict, at_least: int = 1) -> list[str]:
    names = draw(st.lists(st.sampled_from(sorted(table)), min_size=at_least, max_size=4, unique=True))
    args: list[str] = []
    for name in names:
        value = draw(table[name])
        args += [name] if value is None else [name, value]
    return args


# ---------------------------------------------------------------- train


@SETTINGS(40)
@given(data=st.data())
def test_fuzz_train(ws, data):
    folder = fresh(ws)
    table = {
        "--max-steps": small(-2, 3),
        "--batch-size": ints(-1, 12),
        "--lr": floats(-1.0, 0.05),
        "--distance-penalty": floats(-1.0, 5.0),
        "--dp-window": floats(-1.0, 2.0),
        "--dp-partner": choice("forward", "reverse"),
        "--vocab-size": ints(-1, 100_000),
        "--diffusion-steps": ints(-1, 50_000),
        "--schedule": choice("sqrt", "linear", "cosine"),
        "--precision": choice("fp32", "bf16"),
        "--seed": ints(-(2**70), 2**70),
        "--save-every": ints(-1, 4),
        "--keep": ints(-1, 3),
        "--max-minutes": floats(-1.0, 10.0),
        "--preset": choice("tiny"),
        "--device": choice("cpu", "auto", "cuda", "cuda:7"),
        "--resume": st.none(),
        "--overwrite": st.none(),
        "--detect-anomaly": st.none(),
        "--task": st.one_of(st.just(str(ws["task"])), junk, st.builds(lambda b: str(write(folder, "train.jsonl", b).parent), file_bytes)),
        "--config": st.builds(lambda t: str(write(folder, "c.toml", t.encode())), toml_text),
        "--tokenizer": st.builds(lambda b: str(write(folder, "tok.json", b)), file_bytes),
        "--init-from": st.one_of(st.just(str(ws["run"])), st.just(str(folder)), junk),
        "--out": st.one_of(st.just(str(folder / "out")), st.just(str(write(folder, "file", b"x"))), st.just(str(folder))),
    }
    args = options(data.draw, table)
    base = {"--preset": "tiny", "--max-steps": "2", "--task": str(ws["task"]), "--out": str(folder / "run"), "--device": "cpu"}
    for flag, value in base.items():
        if flag not in args:
            args += [flag, value]
    check(invoke("train", *args))


# ---------------------------------------------------------------- sample / evaluate from a checkpoint


def damaged_run(ws, folder: Path, name: str, data: bytes) -> str:
    run = folder / "damaged"
    shutil.copytree(ws["run"], run)
    ckpt = sorted((run / "checkpoints").iterdir())[-1]
    (ckpt / name if name in ("model.safetensors", "ema.safetensors", "state.pt", "manifest.json") else run / name).write_bytes(data)
    return str(run)


def decode_table(ws, folder: Path) -> dict:
    files = st.sampled_from(
        ["config.json", "tokenizer.json", "log.jsonl", "model.safetensors", "ema.safetensors", "state.pt", "manifest.json"]
    )
    return {
        "--checkpoint": st.one_of(
            st.just(str(ws["run"])), junk, st.just(str(folder)), st.builds(lambda n, b: damaged_run(ws, folder, n, b), files, file_bytes)
        ),
        "--sampler": choice("ddpm", "uniform", "skip", "ddim", "ads"),
        "--steps": st.one_of(ints(-2, 12), st.sampled_from(["2000", "2001", str(10**12)])),
        "--update": choice("ddpm", "ddim"),
        "--variance": choice("large", "small"),
        "--eta": floats(-1.0, 2.0),
        "--clamp": st.none(),
        "--no-clamp": st.none(),
        "--ads-shares": st.one_of(junk, st.lists(floats(-1, 2), max_size=4).map(",".join)),
        "--split": choice("test", "valid", "train"),
        "--input": st.builds(lambda b: str(write(folder, "in.jsonl", b)), file_bytes),
        "--limit": small(-1, 3),
        "--seeds": small(-1, 2),
        "--seed": ints(-(2**70), 2**70),
        "--batch-size": ints(-1, 4),
        "--weights": choice("ema", "model"),
        "--device": choice("cpu", "auto", "cuda"),
    }


def limited(args: list[str], ws) -> list[str]:
    """Keep decodes short: a --limit and --steps unless fuzzed; ddpm (all T steps) only on one sentence."""
    if "--limit" not in args:
        args += ["--limit", "2"]
    if "--steps" not in args:
        args += ["--steps", "4"]
    if "--device" not in args:
        args += ["--device", "cpu"]
    if "--checkpoint" not in args:
        args += ["--checkpoint", str(ws["run"])]
    return args


def cap_slow_ddpm(args: list[str]) -> list[str]:
    """A full-T ddpm chain on more than one input is too slow for a fuzz example: decode one input."""
    slow = "ddpm" in args or (
        "--steps" in args
        and args[args.index("--steps") + 1] == "2000"
        and "--limit" in args
        and args[args.index("--limit") + 1] not in ("1", "-1")
    )
    if slow:
        args[args.index("--limit") + 1] = "1"
    return args


def decode_args(ws, data, folder: Path, **extra) -> list[str]:
    """Drawn options of a command that decodes a checkpoint: decode_table's and `extra`'s, kept short."""
    return cap_slow_ddpm(limited(options(data.draw, {**decode_table(ws, folder), **extra}), ws))


@SETTINGS(50)
@given(data=st.data())
def test_fuzz_sample(ws, data):
    folder = fresh(ws)
    out = st.one_of(st.just(str(folder / "o.jsonl")), st.just(str(folder)), st.just(str(folder / "no" / "such" / "o.jsonl")))
    check(invoke("sample", *decode_args(ws, data, folder, **{"--text": junk, "--show": ints(-1, 3), "--out": out})))


@SETTINGS(40)
@given(data=st.data())
def test_fuzz_evaluate(ws, data):
    folder = fresh(ws)
    if data.draw(st.booleans()):  # a predictions file of random content
        args = [str(write(folder, "p.jsonl", data.draw(file_bytes)))]
        if data.draw(st.booleans()):
            args += ["--json", data.draw(st.sampled_from([str(folder / "m.json"), str(folder), str(folder / "x" / "m.json")]))]
    else:
        args = decode_args(ws, data, folder, **{"--json": st.one_of(st.just(str(folder / "m.json")), st.just(str(folder)))})
    check(invoke("evaluate", *args))


@SETTINGS(30)
@given(data=st.data())
def test_fuzz_ablate(ws, data):
    """ablate's own options (it has no --input and no --json: its results go to the --out folder)."""
    folder = fresh(ws)
    decode = decode_table(ws, folder)
    table = {
        **{
            flag: decode[flag]
            for flag in (
                "--checkpoint",
                "--update",
                "--variance",
                "--eta",
                "--clamp",
                "--no-clamp",
                "--ads-shares",
                "--limit",
                "--seeds",
                "--seed",
                "--batch-size",
                "--weights",
                "--device",
            )
        },
        "--sampler": st.one_of(
            junk, st.lists(st.sampled_from(["uniform", "skip", "ddim", "ads", "plms", "", " "]), max_size=3).map(",".join)
        ),
        "--steps": st.one_of(junk, st.lists(ints(-2, 8), max_size=3).map(",".join)),
        "--split": choice("test", "valid"),
        "--precision": choice("auto", "fp32", "bf16"),
        "--out": st.one_of(st.just(str(folder / "grid")), st.just(str(write(folder, "file", b"x"))), st.just(str(folder / "a" / "b"))),
    }
    args = options(data.draw, table)
    for flag, value in (("--sampler", "uniform,ads"), ("--steps", "4"), ("--out", str(folder / "grid"))):
        if flag not in args:
            args += [flag, value]
    check(invoke("ablate", *limited(args, ws)))


# ---------------------------------------------------------------- every numeric flag x extreme values, the rest valid

EDGE_INTS = ["0", "-1", str(2**31), str(2**63), str(2**64), str(10**30), str(-(10**30))]
EDGE_FLOATS = ["nan", "inf", "-inf", "1e308", "-1e308", "5e-324", "-0.0"]
NUMERIC = {
    "train": {
        "ints": ["--batch-size", "--vocab-size", "--diffusion-steps", "--seed", "--save-every", "--keep"],
        "floats": ["--lr", "--distance-penalty", "--dp-window", "--max-minutes"],
    },
    "sample": {"ints": ["--steps", "--seed", "--batch-size", "--show"], "floats": ["--eta"]},
    "evaluate": {"ints": ["--steps", "--seed", "--batch-size"], "floats": ["--eta"]},
    "ablate": {"ints": ["--steps", "--seed", "--batch-size"], "floats": []},
}
EDGE_CASES = [
    (cmd, flag, value)
    for cmd, kinds in NUMERIC.items()
    for kind, values in (("ints", EDGE_INTS), ("floats", EDGE_FLOATS))
    for flag in kinds[kind]
    for value in values
]


@pytest.mark.parametrize("command,flag,value", EDGE_CASES)
def test_every_numeric_flag_at_its_edges(ws, command, flag, value):
    if command == "train":
        base = ["--preset", "tiny", "--max-steps", "2", "--task", str(ws["task"]), "--out", str(fresh(ws) / "run")]
    else:
        base = ["--checkpoint", str(ws["run"]), "--limit", "1"] + (["--sampler", "ads"] if command == "ablate" else [])
        if flag != "--steps":
            base += ["--steps", "4"]
    check(invoke(command, flag, value, *base, "--device", "cpu"))


def _config_fields():
    from dataclasses import fields

    from diffutext.config import DiffusionConfig, ModelConfig, TrainConfig

    for section, cls in (("model", ModelConfig), ("diffusion", DiffusionConfig), ("train", TrainConfig)):
        for f in fields(cls):
            default = getattr(cls(), f.name)
            if (section, f.name) == ("model", "vocab_size") or type(default) not in (int, float):  # vocab comes from the tokenizer
                continue
            for value in ["0", "-1", str(2**31), str(10**30)] if type(default) is int else ["nan", "inf", "-1e308", "1e308"]:
                yield section, f.name, value


@pytest.mark.parametrize("section,field,value", list(_config_fields()))
def test_every_numeric_config_field_at_its_edges(ws, section, field, value):
    folder = fresh(ws)
    toml = write(folder, "c.toml", f"[{section}]\n{field} = {value}\n".encode())
    # --max-steps on the command line wins over the file, so a huge train.max_steps cannot make this slow
    check(
        invoke(
            "train",
            "--config",
            toml,
            "--preset",
            "tiny",
            "--max-steps",
            "2",
            "--task",
            str(ws["task"]),
            "--out",
            str(folder / "run"),
            "--device",
            "cpu",
        )
    )


# ---------------------------------------------------------------- inputs the fuzzing found (each was a traceback, exit 1 or a hang)


@pytest.mark.parametrize(
    "command,args,message",
    [
        ("train", ["--seed", str(2**70)], "train.seed must be in"),  # torch.manual_seed overflow traceback
        ("train", ["--vocab-size", str(2**31)], "vocab_size must be between"),  # the Rust BPE trainer aborted the interpreter
        ("train", ["--lr", "inf"], "lr must be a finite number"),  # trained to a NaN, exit 1
        ("train", ["--distance-penalty", "inf"], "distance_penalty must be a finite number"),
        ("train", ["--max-minutes", "inf"], "max_minutes must be a finite number"),
        ("train", ["--diffusion-steps", "10**9"], "--diffusion-steps"),
        ("train", ["--diffusion-steps", str(10**9)], "diffusion.T must be between 2 and"),  # minutes building the ᾱ table
        ("sample", ["--seed", str(2**70)], "--seed"),  # torch.Generator.manual_seed overflow traceback
        ("sample", ["--sampler", "ddim", "--eta", "inf"], "eta must be a finite number"),  # decoded garbage, exit 0
        ("sample", ["--ads-shares", "1e308,1e308,1e308"], "ADS shares"),  # OverflowError traceback
        ("sample", ["--steps", str(10**12)], "cannot visit"),  # hung building a 10^12-point list
        ("ablate", ["--sampler", "ads", "--steps", str(10**12)], "cannot visit"),
    ],
)
def test_inputs_found_by_fuzzing_exit_2(ws, command, args, message):
    extra = (
        ["--out", str(fresh(ws) / "run"), "--preset", "tiny", "--max-steps", "2", "--task", str(ws["task"])]
        if command == "train"
        else ["--checkpoint", str(ws["run"]), "--limit", "1"]
    )
    assert_one_line_error(invoke(command, *args, *extra, "--device", "cpu"), message)


def test_a_long_sqrt_schedule_has_no_division_by_zero():
    from diffutext.diffusion import alpha_bar_table

    ab = alpha_bar_table("sqrt", 50_000)  # ᾱ(s) of the sqrt schedule is 0 at s = 0.9999 = 49995/50000
    assert torch.isfinite(ab).all() and (ab[1:] <= ab[:-1]).all()
