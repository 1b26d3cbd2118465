"""Numerical faults: a NaN/inf loss stops training with one line naming the step and the
terms, exit 1, and no checkpoint with non-finite weights is ever written; --detect-anomaly names the op."""

import math

import pytest
import torch

from diffutext import trainer as train_mod  # where the training step calls diffusion_loss
from diffutext.checkpoint import list_checkpoints, open_run
from diffutext.config import resolve
from diffutext.train import train
from diffutext.trainer import _check_finite
from helpers import assert_one_line_error, invoke


def poison_loss(monkeypatch, from_call: int, make_bad):
    """Make the training loss go bad from the `from_call`-th training step on."""
    monkeypatch.undo()
    real, calls = train_mod.diffusion_loss, [0]

    def diffusion_loss(*args, **kwargs):
        terms = real(*args, **kwargs)
        calls[0] += 1
        return make_bad(terms) if calls[0] >= from_call else terms

    monkeypatch.setattr(train_mod, "diffusion_loss", diffusion_loss)


def times(value):
    return lambda terms: {**terms, "mse": terms["mse"] * value, "loss": terms["loss"] * value}


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_non_finite_loss_stops_before_any_checkpoint_holds_it(small_task, tmp_path, monkeypatch, value):
    # save every 3 steps, log every 5: the save at step 9 comes before the log at step 10 and must refuse
    cfg = resolve("tiny", {"train": {"task": str(small_task), "max_steps": 20, "save_every": 3, "log_every": 5, "eval_every": 0}})
    poison_loss(monkeypatch, 7, times(value))
    with pytest.raises(FloatingPointError, match=r"^step 7: non-finite loss terms \(.*mse=") as e:
        train(cfg, tmp_path / "run", device="cpu")
    assert "no checkpoint written after it" in str(e.value)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-00000003", "step-00000006"]
    ck = open_run(tmp_path / "run")
    for which in ("model", "ema"):
        assert all(torch.isfinite(w).all() for w in ck.weights(which).values())


def test_non_finite_weights_are_caught_even_with_a_finite_loss():
    model = torch.nn.Linear(2, 2)
    _check_finite(5, torch.tensor(-1), {"loss": torch.tensor(1.0)}, model)
    with torch.no_grad():
        model.weight[0, 0] = math.inf
    with pytest.raises(FloatingPointError, match="by step 5: non-finite loss or weights"):
        _check_finite(5, torch.tensor(-1), {"loss": torch.tensor(1.0)}, model)


def test_a_huge_learning_rate_exits_1_with_one_line(small_task, tmp_path):
    run = tmp_path / "run"
    result = invoke("train", "--task", small_task, "--preset", "tiny", "--max-steps", 12, "--lr", "1e30", "--out", run, "--device", "cpu")
    assert_one_line_error(result, "step 2: non-finite loss terms", "mse=nan", "--lr", code=1, alone=False)  # after progress lines
    assert list_checkpoints(run) == []


def sqrt_of_negative(terms):
    return {**terms, "loss": terms["loss"] + torch.sqrt(terms["mse"] - 1e6)}


def test_detect_anomaly_names_the_operation(small_task, tmp_path, monkeypatch, recwarn):
    poison_loss(monkeypatch, 4, sqrt_of_negative)
    args = ["train", "--task", small_task, "--preset", "tiny", "--max-steps", 8, "--save-every", 2, "--device", "cpu"]
    result = invoke(*args, "--out", tmp_path / "plain")
    assert_one_line_error(result, "step 4: non-finite loss terms", code=1, alone=False)
    poison_loss(monkeypatch, 4, sqrt_of_negative)  # count the steps afresh
    result = invoke(*args, "--out", tmp_path / "anomaly", "--detect-anomaly")
    assert result.exit_code == 1
    last = result.stderr.strip().splitlines()[-1]  # anomaly mode warns with the forward trace (its purpose), then our line
    trace = result.stderr + "".join(str(w.message) for w in recwarn.list)  # the trace is a warning: recorded here, printed in a shell
    assert last.startswith("error: autograd anomaly: Function 'SqrtBackward0' returned nan") and "sqrt_of_negative" in trace
    assert open_run(tmp_path / "anomaly").step == 2
    assert not torch.is_anomaly_enabled()  # anomaly mode is switched off again
