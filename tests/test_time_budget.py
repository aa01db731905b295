"""--minutes: a training run that stops itself when its time budget is spent, at a log row, with every
record of a finished run, and that --resume continues to the step the run would have reached."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from shared.errors import UserError
from shared.records.checkpoint import load_checkpoint
from shared.records.runs import read_log
from shared.training.config import check_config
from shared.training.loop import train
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
