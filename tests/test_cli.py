"""The command line end to end on real (small) data, and its answers to bad usage."""

import json
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from diffutext.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_help_is_fast_and_imports_no_torch():
    code = "import time,sys; t=time.time(); from diffutext.cli import app; print(time.time()-t, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert float(out[0]) < 1.0 and out[1] == "False"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "diffutext", "--help"], capture_output=True, check=True)
    assert time.perf_counter() - start < 5  # interpreter start included; the import itself is checked above


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    result = invoke("train", "--preset", "tiny", "--max-steps", 12, "--out", run, "--device", "cpu")
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


@pytest.mark.parametrize("sampler,steps", [("ddpm", 1), ("uniform", 4), ("skip", 4), ("ddim", 4), ("ads", 4)])
def test_every_sampler_decodes_from_the_command_line(cli_run, sampler, steps):
    if sampler == "ddpm":
        pytest.importorskip("torch")
    result = invoke("sample", "--checkpoint", cli_run, "--sampler", sampler, "--steps", steps, "--limit", 2, "--device", "cpu", "--show", 1)
    assert result.exit_code == 0, result.output


def test_text_and_input_file(cli_run, tmp_path):
    result = invoke("sample", "--checkpoint", cli_run, "--text", "And God said, Let there be light.", "--steps", 4, "--device", "cpu")
    assert result.exit_code == 0 and "And God said" in result.output
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"src": "In the beginning"}\n{"src": "And the evening"}\n')
    result = invoke("sample", "--checkpoint", cli_run, "--input", inputs, "--steps", 4, "--device", "cpu", "--out", tmp_path / "o.jsonl")
    assert result.exit_code == 0, result.output
    assert [json.loads(x)["src"] for x in (tmp_path / "o.jsonl").read_text().splitlines()] == ["In the beginning", "And the evening"]


def test_evaluate_from_a_checkpoint_with_mbr(cli_run):
    result = invoke("evaluate", "--checkpoint", cli_run, "--steps", 4, "--limit", 4, "--seeds", 2, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "self-BLEU" in result.output and "div-4" in result.output


def test_ablate_writes_tables_csv_json_and_plots(cli_run, tmp_path):
    out_dir = tmp_path / "grid"
    result = invoke("ablate", "--checkpoint", cli_run, "--checkpoint", cli_run, "--sampler", "uniform,ads", "--steps", "5,4",
                    "--limit", 3, "--seeds", 2, "--device", "cpu", "--out", out_dir)
    assert result.exit_code == 0, result.output
    assert "copy source" in result.output and "self-BLEU" in result.output
    data = json.loads((out_dir / "results.json").read_text())
    cells = [(r["sampler"], r["steps"]) for r in data["rows"]]
    assert cells == [("uniform", 5), ("uniform", 4), ("ads", 5), ("ads", 4), ("copy source", 0)] * 2
    assert data["rows"][3]["timesteps"] == [1999, 1334, 667, 0]
    assert (out_dir / "results.csv").read_text().splitlines()[0].startswith("checkpoint,step,sampler,steps,sacrebleu")
    for png in ("sacrebleu_vs_steps.png", "sentence_bleu_vs_steps.png", "timesteps.png"):
        assert (out_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ablate_refuses_impossible_cells_before_decoding(cli_run, tmp_path):
    result = invoke("ablate", "--checkpoint", cli_run, "--sampler", "ads", "--steps", "2", "--device", "cpu", "--out", tmp_path / "g")
    assert result.exit_code == 2 and "no step for the noisiest third" in result.output
    assert not (tmp_path / "g").exists()


def test_sample_uses_the_newest_run(cli_run, tmp_path, monkeypatch):
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(cli_run, tmp_path / "runs" / "only")
    result = invoke("sample", "--steps", 20, "--sampler", "ads", "--limit", 2, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "runs/only" in result.output


@pytest.mark.parametrize("args,message", [
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
])
def test_bad_usage_exits_2_with_one_line_and_no_traceback(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_sample_without_any_run_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("sample", "--steps", 20, "--sampler", "ads")
    assert result.exit_code == 2 and "no trained run" in result.output


def test_bad_predictions_file(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"src": "a", "hyp": "b"}\n')
    result = invoke("evaluate", bad)
    assert result.exit_code == 2 and "p.jsonl:1" in result.output


def test_a_failed_sample_keeps_the_previous_output(cli_run, tmp_path):
    out_file = tmp_path / "keep.jsonl"
    out_file.write_text("previous\n")
    result = invoke("sample", "--checkpoint", cli_run, "--sampler", "ads", "--steps", 2, "--out", out_file, "--device", "cpu")
    assert result.exit_code == 2 and out_file.read_text() == "previous\n"


def test_an_explicit_step_count_replaces_the_presets_minutes(tmp_path):
    (tmp_path / "c.toml").write_text('preset = "tiny"\n[train]\nmax_minutes = 5.0\n')
    timed = invoke("train", "--config", tmp_path / "c.toml", "--max-steps", 2, "--out", tmp_path / "a", "--device", "cpu")
    both = invoke("train", "--config", tmp_path / "c.toml", "--max-steps", 2, "--max-minutes", 3, "--out", tmp_path / "b", "--device", "cpu")
    assert timed.exit_code == 0 and both.exit_code == 0, timed.output + both.output
    stored = lambda run: json.loads((tmp_path / run / "config.json").read_text())["train"]
    assert stored("a")["max_minutes"] == 0.0 and stored("a")["max_steps"] == 2
    assert stored("b")["max_minutes"] == 3.0
