"""The command line end to end on real (small) data, and its answers to bad usage."""

import json
import subprocess
import sys

import datasets
import pytest

from diffutext.config import SampleConfig
from diffutext.evaluate import decode, load_model
from helpers import assert_one_line_error, copy_run, invoke


def test_help_imports_none_of_the_heavy_libraries():
    """`--help` stays instant because it imports neither torch nor datasets nor nltk (checked by the modules loaded,
    not by a clock: timings on a shared machine prove nothing)."""
    code = (
        "import sys\nfrom diffutext.cli import main\nsys.argv = ['diffutext', 'train', '--help']\ntry:\n    main()\n"
        "except SystemExit:\n    pass\nprint(sorted(m for m in ('torch', 'datasets', 'nltk', 'pyarrow') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "--max-steps" in done.stdout and done.stdout.strip().splitlines()[-1] == "[]"


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, small_task):
    """A run trained through the command line; T = 200 keeps the full-T ddpm decode short."""
    run = tmp_path_factory.mktemp("cli") / "run"
    result = invoke(
        "train", "--task", small_task, "--preset", "tiny", "--max-steps", 12, "--diffusion-steps", 200, "--out", run, "--device", "cpu"
    )
    assert result.exit_code == 0, result.output
    return run


def test_train_sample_evaluate_end_to_end(cli_run, tmp_path):
    preds = tmp_path / "preds.jsonl"
    result = invoke("sample", "--checkpoint", cli_run, "--sampler", "ads", "--steps", 5, "--limit", 6, "--out", preds, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "source" in result.output and "reference" in result.output and "sacreBLEU" in result.output
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(rows) == 6 and set(rows[0]) == {"src", "trg", "hyp"}
    metrics_file = tmp_path / "m.json"
    result = invoke("evaluate", preds, "--json", metrics_file)
    assert result.exit_code == 0, result.output
    scores = json.loads(metrics_file.read_text())
    assert {"sacrebleu", "sentence_bleu", "rouge_l", "dist_1", "avg_len"} <= set(scores) and scores["count"] == 6


def flat(text: str) -> str:
    """Whitespace collapsed: rich wraps long lines at the runner's terminal width."""
    return " ".join(text.split())


@pytest.mark.parametrize("sampler,steps,visited", [("ddpm", 1, 200), ("uniform", 4, 4), ("skip", 4, 4), ("ddim", 4, 4), ("ads", 4, 4)])
def test_every_sampler_decodes_from_the_command_line(cli_run, small_task, tmp_path, sampler, steps, visited):
    """The command line decodes what the engine decodes with that sampler: --out holds one row per input
    (the split's source and reference, the decoded text), the one example shown is the first row, and the
    metrics title names the sampler and the timesteps it visited (ddpm: all T, whatever --steps says)."""
    out = tmp_path / "o.jsonl"
    result = invoke(
        "sample",
        "--checkpoint",
        cli_run,
        "--sampler",
        sampler,
        "--steps",
        steps,
        "--limit",
        2,
        "--device",
        "cpu",
        "--show",
        1,
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    pairs = [json.loads(line) for line in (small_task / "test.jsonl").read_text().splitlines()[:2]]
    inputs = datasets.Dataset.from_dict({"src": [p["src"] for p in pairs], "trg": [p["trg"] for p in pairs]})
    engine = decode(load_model(cli_run), inputs, SampleConfig(sampler=sampler, steps=steps))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [{"src": p["src"], "trg": p["trg"], "hyp": h} for p, h in zip(pairs, engine.hyps)]
    assert engine.steps == visited and f"{sampler}-{visited} steps on 2 sentences" in result.output
    shown = flat(result.output)
    assert flat(f"source {pairs[0]['src']} output {rows[0]['hyp']} reference {pairs[0]['trg']}") in shown
    assert shown.count("source ") == 1 and pairs[1]["src"] not in shown  # --show 1: one example only


def test_text_and_input_file(cli_run, tmp_path):
    text = "And God said, Let there be light."
    result = invoke("sample", "--checkpoint", cli_run, "--text", text, "--steps", 4, "--device", "cpu")
    assert result.exit_code == 0 and text in result.output  # the example table shows the source
    result = invoke("sample", "--checkpoint", cli_run, "--text", text, "--steps", 4, "--device", "cpu", "--show", 0)
    import diffutext

    (expected,) = diffutext.load(cli_run, device="cpu").generate([text], steps=4)
    assert result.exit_code == 0 and expected.strip() and result.stdout.strip() == expected.strip()  # the output alone
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"src": "In the beginning"}\n{"src": "And the evening"}\n')
    result = invoke("sample", "--checkpoint", cli_run, "--input", inputs, "--steps", 4, "--device", "cpu", "--out", tmp_path / "o.jsonl")
    assert result.exit_code == 0, result.output
    assert [json.loads(x)["src"] for x in (tmp_path / "o.jsonl").read_text().splitlines()] == ["In the beginning", "And the evening"]


def test_evaluate_from_a_checkpoint_with_mbr(cli_run, tmp_path):
    result = invoke(
        "evaluate", "--checkpoint", cli_run, "--steps", 4, "--limit", 4, "--seeds", 2, "--device", "cpu", "--json", tmp_path / "m.json"
    )
    assert result.exit_code == 0, result.output
    assert "self-BLEU" in result.output and "div-4" in result.output
    scores = json.loads((tmp_path / "m.json").read_text())
    assert scores["count"] == 4 and scores["seeds"] == 2 and 0 <= scores["self_bleu"] <= 1 and 0 < scores["div_4"] <= 1


def test_ablate_writes_tables_csv_json_and_plots(cli_run, tmp_path):
    out_dir = tmp_path / "grid"
    result = invoke(
        "ablate",
        "--checkpoint",
        cli_run,
        "--checkpoint",
        cli_run,
        "--sampler",
        "uniform,ads",
        "--steps",
        "5,4",
        "--limit",
        3,
        "--seeds",
        2,
        "--device",
        "cpu",
        "--out",
        out_dir,
    )
    assert result.exit_code == 0, result.output
    assert "copy source" in result.output and "self-BLEU" in result.output
    data = json.loads((out_dir / "results.json").read_text())
    cells = [(r["sampler"], r["steps"]) for r in data["rows"]]
    assert cells == [("uniform", 5), ("uniform", 4), ("ads", 5), ("ads", 4), ("copy source", 0)] * 2
    assert data["rows"][3]["timesteps"] == [199, 134, 67, 0]  # ADS-4 at T = 200: the thirds' first points and T − 1
    assert (out_dir / "results.csv").read_text().splitlines()[0].startswith("checkpoint,step,sampler,steps,sacrebleu")
    for png in ("sacrebleu_vs_steps.png", "sentence_bleu_vs_steps.png", "timesteps.png"):
        assert (out_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ablate_takes_an_input_file_with_references(cli_run, tmp_path):
    """`ablate --input FILE`: the file's pairs are decoded and scored (a task whose test split is held out); a file
    without references, or --split beside --input, is refused with one line."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"src": "In the beginning", "trg": "At the first"}\n{"src": "And the evening", "trg": "And it was evening"}\n')
    args = ("ablate", "--checkpoint", cli_run, "--sampler", "ads", "--steps", "4", "--device", "cpu")
    result = invoke(*args, "--input", pairs, "--out", tmp_path / "g")
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "g" / "results.json").read_text())
    assert data["split"] == str(pairs) and data["sentences"] == 2
    bare = tmp_path / "bare.jsonl"
    bare.write_text('{"src": "In the beginning"}\n')
    assert_one_line_error(invoke(*args, "--input", bare, "--out", tmp_path / "h"), "has no references")
    assert_one_line_error(invoke(*args, "--input", pairs, "--split", "valid"), "not both")


def test_ablate_refuses_impossible_cells_before_decoding(cli_run, tmp_path):
    result = invoke("ablate", "--checkpoint", cli_run, "--sampler", "ads", "--steps", "2", "--device", "cpu", "--out", tmp_path / "g")
    assert_one_line_error(result, "no step for the noisiest third")
    assert not (tmp_path / "g").exists()


def test_sample_uses_the_newest_run(cli_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    copy_run(cli_run, tmp_path / "runs" / "only")
    result = invoke("sample", "--steps", 20, "--sampler", "ads", "--limit", 2, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "runs/only" in result.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "--task", "no-such-task"], "unknown task"),
        (["train", "--task", "/no/such/folder"], "does not exist"),
        (["train", "--preset", "huge"], "huge"),
        (["train", "--lr", "-1"], "--lr"),
        (["train", "--max-steps", "zero"], "--max-steps"),
        (["sample", "--checkpoint", "/no/such/run"], "run folder not found"),
        (["sample", "--sampler", "plms"], "plms"),
        (["sample", "--steps", "0"], "--steps"),
        (["ablate", "--sampler", "ads,plms"], "plms"),
        (["ablate", "--steps", "20,x"], "20,x"),
        (["evaluate", "/no/such/predictions.jsonl"], "not found"),
        (["train", "--config", "/no/such.toml"], "not found"),
    ],
)
def test_bad_usage_exits_2_with_one_line_and_no_traceback(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(invoke(*args), message)


def test_sample_without_any_run_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(invoke("sample", "--steps", 20, "--sampler", "ads"), "no trained run")


def test_bad_predictions_file(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"src": "a", "hyp": "b"}\n')
    assert_one_line_error(invoke("evaluate", bad), "p.jsonl:1")


def test_a_failed_sample_keeps_the_previous_output(cli_run, tmp_path):
    out_file = tmp_path / "keep.jsonl"
    out_file.write_text("previous\n")
    result = invoke("sample", "--checkpoint", cli_run, "--sampler", "ads", "--steps", 2, "--out", out_file, "--device", "cpu")
    assert_one_line_error(result, "ADS with 2 steps")
    assert out_file.read_text() == "previous\n"


def test_an_explicit_step_count_replaces_the_presets_minutes(tmp_path, small_task):
    (tmp_path / "c.toml").write_text('preset = "tiny"\n[train]\nmax_minutes = 5.0\n')
    args = ["train", "--config", tmp_path / "c.toml", "--task", small_task, "--max-steps", 2, "--device", "cpu"]
    timed = invoke(*args, "--out", tmp_path / "a")
    both = invoke(*args, "--max-minutes", 3, "--out", tmp_path / "b")
    assert timed.exit_code == 0 and both.exit_code == 0, timed.output + both.output
    stored = lambda run: json.loads((tmp_path / run / "config.json").read_text())["train"]
    assert stored("a")["max_minutes"] == 0.0 and stored("a")["max_steps"] == 2
    assert stored("b")["max_minutes"] == 3.0


def test_checkpoints_of_one_run_side_by_side(tiny_run, tmp_path):
    """--checkpoint RUN/checkpoints/step-N (zero-padded or not) or --step N picks one checkpoint; ablate compares two."""
    out_dir = tmp_path / "grid"
    first, second = tiny_run / "checkpoints" / "step-10", tiny_run / "checkpoints" / "step-00000020"
    result = invoke(
        "ablate",
        "--checkpoint",
        first,
        "--checkpoint",
        second,
        "--sampler",
        "uniform",
        "--steps",
        4,
        "--limit",
        2,
        "--device",
        "cpu",
        "--out",
        out_dir,
    )
    assert result.exit_code == 0, result.output
    rows = json.loads((out_dir / "results.json").read_text())["rows"]
    assert [(r["checkpoint"], r["step"], r["sampler"]) for r in rows] == [
        (str(first), 10, "uniform"),
        (str(first), 10, "copy source"),
        (str(second), 20, "uniform"),
        (str(second), 20, "copy source"),
    ]
    result = invoke("sample", "--checkpoint", tiny_run, "--step", 10, "--steps", 4, "--limit", 1, "--device", "cpu")
    assert result.exit_code == 0 and "(step 10," in result.output, result.output
    assert_one_line_error(invoke("sample", "--checkpoint", tiny_run, "--step", 15, "--device", "cpu"), "steps 10, 20")
    assert_one_line_error(invoke("evaluate", "--checkpoint", first, "--step", 20, "--device", "cpu"), "different checkpoints")


def test_version_and_env_say_what_diffutext_runs_on():
    from diffutext import __version__

    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"diffutext {__version__}"
    result = invoke("env")
    assert result.exit_code == 0, result.output
    lines = dict(line.split("  ", 1) for line in result.stdout.splitlines())
    import torch

    assert lines["torch"].strip() == torch.__version__
    assert lines["device (auto)"].strip().startswith("cpu" if not torch.cuda.is_available() else "cuda")
    assert lines["precision auto resolves to"].strip() in ("bf16", "fp32")
    assert lines["torch threads"].strip() == str(torch.get_num_threads())


def test_off_a_terminal_training_prints_a_plain_loss_line_per_log_step(tmp_path, small_task):
    result = invoke("train", "--preset", "tiny", "--task", small_task, "--out", tmp_path / "run", "--max-steps", 10)
    assert result.exit_code == 0, result.output
    steps = [line for line in result.stderr.splitlines() if line.startswith("step ") and " loss " in line]
    assert [line.split(":")[0] for line in steps][:2] == ["step 5", "step 10"]  # log_every 5 in the tiny preset
    assert "tok/s" in steps[0] and "lr " in steps[0]


def test_the_python_api_generates_what_sample_writes(tiny_run, tmp_path):
    import diffutext

    sources = ["And God said, Let there be light: and there was light.", "Jesus wept."]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"src": s}) + "\n" for s in sources))
    result = invoke(
        "sample", "--checkpoint", tiny_run, "--input", tmp_path / "in.jsonl", "--steps", 5, "--seed", 3, "--out", tmp_path / "out.jsonl"
    )
    assert result.exit_code == 0, result.output
    written = [json.loads(line)["hyp"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    model = diffutext.load(tiny_run, device="cpu")
    assert model.generate(sources, steps=5, seed=3) == written
    assert model.generate([]) == []
    with pytest.raises(TypeError, match="unknown option"):
        model.generate(sources, temperature=0.5)
    with pytest.raises(TypeError, match="list"):
        model.generate("Jesus wept.")


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "--preset", "tiny", "--dp-window", "0.1"], "--dp-window shape(s) the Distance Penalty, which is off"),
        (
            ["train", "--preset", "tiny", "--dp-partner", "reverse", "--dp-from", "0.5"],
            "--dp-from, --dp-partner shape(s) the Distance Penalty",
        ),
        (["train", "--preset", "tiny", "--dp-window-ends", "reference"], "--dp-window-ends"),
        (["train", "--preset", "tiny", "--anchor-smoothing", "0.1"], "--anchor-smoothing smooths the anchor loss, which is off"),
        (["train", "--preset", "tiny", "--lexicon-model", "ibm1"], "--lexicon-model counts the copy lexicon, which is off"),
        (["train", "--preset", "tiny", "--overwrite"], "--overwrite replaces the run folder given by --out"),
        (["sample", "--ads-shares", "0.2,0.3,0.5", "--sampler", "uniform"], "--ads-shares sets ADS's step shares"),
        (["sample", "--eta", "0.5"], "--eta is DDIM's"),
        (["sample", "--variance", "small", "--sampler", "ddim"], "--variance is the ancestral update's"),
        (["sample", "--clamp-by", "head", "--no-clamp"], "with --no-clamp nothing is snapped"),
        (["ablate", "--sampler", "ads,uniform", "--eta", "0.3"], "--eta is DDIM's"),
        (["evaluate", "predictions.jsonl", "--steps", "5", "--seeds", "3"], "evaluate FILE scores the file as it is: --seeds, --steps"),
    ],
)
def test_an_option_that_would_be_ignored_is_refused(args, message, tmp_path, monkeypatch):
    """Each option the run would not read exits 2 with one line saying why, before any work."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "predictions.jsonl").write_text(json.dumps({"src": "a", "trg": "b", "hyp": "b"}) + "\n")
    assert_one_line_error(invoke(*args), message)


def test_options_that_are_read_pass_the_checks(cli_run, tmp_path):
    """The same options where they take effect: nothing is refused."""
    for args in (
        ["--sampler", "ddim", "--eta", "0.5"],
        ["--update", "ddim", "--eta", "0.5"],
        ["--variance", "small"],
        ["--ads-shares", "0.2,0.3,0.5"],
        ["--no-clamp"],
        ["--clamp-by", "head"],
    ):
        result = invoke("sample", "--checkpoint", cli_run, "--limit", 2, "--steps", 5, *args)
        assert result.exit_code == 0, (args, result.output)


def test_resume_takes_only_its_budget_and_says_which_settings_it_keeps(tiny_run, small_task, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    for flag, value in (("--lr", "1e-5"), ("--batch-size", "4"), ("--distance-penalty", "1"), ("--preset", "small")):
        line = assert_one_line_error(invoke("train", "--out", run, "--resume", flag, value), f"{flag} cannot change them")
        assert "--max-steps, --max-minutes" in line and "--init-from" in line
    result = invoke("train", "--out", run, "--resume", "--max-steps", 22)
    assert result.exit_code == 0, result.output
    # the first command run again with --resume: its settings repeat the stored ones and are accepted
    result = invoke("train", "--preset", "tiny", "--task", small_task, "--out", run, "--resume", "--max-steps", 24)
    assert result.exit_code == 0, result.output


def test_init_from_refuses_a_network_flag_and_a_flag_preset_beats_the_files(tiny_run, small_task, tmp_path):
    assert_one_line_error(
        invoke("train", "--init-from", tiny_run, "--arch", "encdec", "--out", tmp_path / "a"),
        "--init-from keeps its run's network; --arch cannot change it",
    )
    config = tmp_path / "c.toml"
    config.write_text('preset = "small"\n[train]\nmax_steps = 2\n')
    run = tmp_path / "b"
    result = invoke("train", "--config", config, "--preset", "tiny", "--task", small_task, "--out", run)
    assert result.exit_code == 0, result.output
    stored = json.loads((run / "config.json").read_text())
    stored = stored.get("config", stored)
    assert stored["model"]["width"] == 32 and stored["train"]["max_steps"] == 2  # tiny's width, the file's steps
