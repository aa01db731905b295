"""--minutes: a training run that stops itself when its time budget is spent, at a log row, with every
record of a finished run, and that --resume continues to the step the run would have reached; with a
cosine decay, a run too long for its budget is shortened at the end of the warm-up so the decay ends in
time, and the CPU recipe carries such a budget."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from shared.errors import UserError
from shared.records.checkpoint import load_checkpoint
from shared.records.runs import read_log
from shared.training.config import CPU_RECIPE, TrainConfig, apply_cpu_recipe, check_config
from shared.training.loop import Trainer, lr_factor, steps_in_budget, train
from tests.stage3_helpers import FAST_ARGS, edge_bar_dataset, one_thread, run_train  # noqa: F401 (fixture)
from tests.test_training import tiny_cfg

STEPS, LOG_EVERY = 30, 5
TINY_BUDGET = 1e-9  # minutes: spent before the first log row


def test_a_spent_budget_stops_at_the_next_log_row_with_every_record(tmp_path):
    cfg = tiny_cfg(tmp_path, max_steps=STEPS, log_every=LOG_EVERY, minutes=TINY_BUDGET)
    result = train(cfg, edge_bar_dataset(128))
    run = result.run_dir
    assert result.out_of_time and result.progress.step == LOG_EVERY
    assert [int(r["step"]) for r in read_log(run / "log.csv")] == [LOG_EVERY]
    assert load_checkpoint(run / "last.pt")["progress"]["step"] == LOG_EVERY
    for name in ("ema.pt", "loss.png", f"samples-{LOG_EVERY:07d}.png"):
        assert (run / name).is_file(), name


def test_resume_after_the_budget_reaches_the_uninterrupted_weights(tmp_path):
    data = edge_bar_dataset(128)
    whole = train(tiny_cfg(tmp_path / "whole", max_steps=STEPS, log_every=LOG_EVERY), data)
    assert not whole.out_of_time and whole.progress.step == STEPS
    cut_cfg = tiny_cfg(tmp_path / "cut", max_steps=STEPS, log_every=LOG_EVERY, minutes=TINY_BUDGET)
    cut = train(cut_cfg, data)
    # the budget is inherited from the checkpoint unless given: a new one lets the run finish
    resumed = train(dataclasses.replace(cut_cfg, resume=str(cut.run_dir), minutes=60.0), data,
                    given={"resume", "minutes", "out", "device"})
    assert not resumed.out_of_time and resumed.progress.step == STEPS
    for a, b in zip(whole.ema.state_dict().values(), resumed.ema.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf")])
def test_bad_budgets_are_refused(tmp_path, value):
    with pytest.raises(UserError, match="minutes must be a finite number > 0"):
        check_config(tiny_cfg(tmp_path, minutes=value))


@pytest.mark.parametrize("text", ["0", "nan", "soon"])
def test_bad_minutes_flag_is_one_line(tmp_path, text):
    res = run_train(["--dataset", "mnist", "--data-dir", str(tmp_path), *FAST_ARGS, "--minutes", text], tmp_path)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "--minutes" in res.stderr


def test_steps_in_budget_closed_form():
    # at step 100 of 1,000, 0.5 s a step, 300 s left: 0.95 · 300 / 0.5 = 570 more steps
    assert steps_in_budget(100, 1000, 0.5, 300.0) == 670
    assert steps_in_budget(100, 1000, 0.5, 3000.0) == 1000  # fits: never longer than planned
    assert steps_in_budget(100, 1000, 0.5, -5.0) == 100     # already spent: stop here
    assert steps_in_budget(100, 1000, 0.5, 300.0, margin=1.0) == 700


SECONDS_PER_STEP, WARMUP, PLANNED = 2.0, 10, 50
FITTED = WARMUP + math.floor(0.95 * (60 - WARMUP * SECONDS_PER_STEP) / SECONDS_PER_STEP)  # a 1-minute budget: 29


def _fake_clock(monkeypatch):
    """Every step takes SECONDS_PER_STEP on the run's clock, whatever this machine's speed."""
    monkeypatch.setattr(Trainer, "clock_s", lambda self: SECONDS_PER_STEP * self.steps_here)


def _budget_cfg(tmp_path, **overrides):
    return tiny_cfg(tmp_path, max_steps=PLANNED, warmup_steps=WARMUP, cosine=True, minutes=1.0, log_every=1,
                    ckpt_every=20, **overrides)


def test_a_cosine_run_too_long_for_its_budget_decays_to_zero_in_time(tmp_path, monkeypatch, capsys):
    _fake_clock(monkeypatch)
    result = train(_budget_cfg(tmp_path), edge_bar_dataset(128))
    run = result.run_dir
    assert not result.out_of_time and result.progress.step == FITTED
    out = capsys.readouterr().out
    assert f"the cosine decay now ends at step {FITTED}" in out and "1-minute budget" in out, out
    rows = read_log(run / "log.csv")
    lrs = [float(r["lr"]) for r in rows]  # the LR each step trained with: the cosine over the fitted length
    expected = [1e-3 * lr_factor(s, WARMUP, FITTED, True) for s in range(FITTED)]
    assert lrs == pytest.approx(expected, rel=1e-6)
    options = json.loads((run / "options.json").read_text())["options"]
    assert options["max_steps"] == options["resolved_max_steps"] == FITTED
    assert load_checkpoint(run / "last.pt")["options"]["max_steps"] == FITTED


def test_resume_of_a_fitted_run_keeps_its_length_and_weights(tmp_path, monkeypatch):
    _fake_clock(monkeypatch)
    data = edge_bar_dataset(128)
    whole = train(_budget_cfg(tmp_path / "whole"), data)
    # the same run on a machine that slows down after the fit: the budget stops it early, at step 24
    # (20 s of warm-up, then 3 s a step), and --resume with a new budget goes on to the fitted end
    monkeypatch.setattr(Trainer, "clock_s", lambda self: SECONDS_PER_STEP * min(self.steps_here, WARMUP)
                        + 3.0 * max(self.steps_here - WARMUP, 0))
    cut_cfg = _budget_cfg(tmp_path / "cut")
    cut = train(cut_cfg, data)
    assert cut.out_of_time and cut.progress.step == 24
    resumed = train(dataclasses.replace(cut_cfg, resume=str(cut.run_dir), minutes=60.0), data,
                    given={"resume", "minutes", "out", "device"})
    assert not resumed.out_of_time and resumed.progress.step == whole.progress.step == FITTED
    for a, b in zip(whole.ema.state_dict().values(), resumed.ema.state_dict().values()):
        assert torch.equal(a, b)


def test_a_run_that_fits_its_budget_is_unchanged(tmp_path, monkeypatch):
    monkeypatch.setattr(Trainer, "clock_s", lambda self: 0.01 * self.steps_here)
    data = edge_bar_dataset(128)
    budgeted = train(_budget_cfg(tmp_path / "a"), data)
    plain = train(dataclasses.replace(_budget_cfg(tmp_path / "b"), minutes=None), data)
    assert budgeted.progress.step == plain.progress.step == PLANNED
    for a, b in zip(budgeted.ema.state_dict().values(), plain.ema.state_dict().values()):
        assert torch.equal(a, b)


def test_the_cpu_recipe_carries_a_budget_unless_a_length_is_given(tmp_path):
    cpu = torch.device("cpu")
    cfg, note = apply_cpu_recipe(TrainConfig(out=str(tmp_path)), set(), cpu)
    assert cfg.minutes == CPU_RECIPE["minutes"] and f"within {CPU_RECIPE['minutes']:g} minutes" in note
    for flag, value in (("max_steps", 99), ("epochs", 3), ("minutes", 4.0)):
        cfg, _ = apply_cpu_recipe(TrainConfig(out=str(tmp_path), **{flag: value}), {flag}, cpu)
        assert cfg.minutes == (4.0 if flag == "minutes" else None), flag
