"""Prompt parsing, label checks, the CFG combination and the interactive prompt loop."""
from __future__ import annotations

import pytest
import torch

from shared.errors import UserError
from shared.diffusion.guidance import cfg_combine, check_labels
from shared.interface.prompts import PromptError, parse_prompt, prompt_loop


@pytest.mark.parametrize("text,expected", [
    ("seven", 7), (" Seven ", 7), ("SEVEN", 7), ("se ven", 7), ("7", 7), (" 7\n", 7), ("zero", 0),
    ("Nine", 9), ("0", 0), ("t h r e e", 3),
])
def test_number_words_and_digits(text, expected):
    assert parse_prompt(text) == expected


@pytest.mark.parametrize("text", ["eleven", "10", "-1", "", "sevenn", "7.0", "seven eight", "dog"])
def test_unreadable_prompts_list_what_is_accepted(text):
    with pytest.raises(PromptError) as err:
        parse_prompt(text)
    message = str(err.value)
    assert "accepted" in message and "0-9" in message and "seven" in message
    assert isinstance(err.value, UserError)


def test_prompts_respect_the_number_of_classes_and_dataset_names():
    assert parse_prompt("2", num_classes=3) == 2
    with pytest.raises(PromptError, match="0-2"):
        parse_prompt("five", num_classes=3)
    assert parse_prompt("Ship", num_classes=10, dataset="cifar10") == 8
    assert parse_prompt("ankle boot", num_classes=10, dataset="fashion-mnist") == 9
    with pytest.raises(PromptError, match="unconditional"):
        parse_prompt("1", num_classes=0)


def test_check_labels():
    assert check_labels(None, 3, 10) is None
    assert check_labels([1, 2, 3], 3, 10).dtype == torch.long
    with pytest.raises(UserError, match="lie in"):
        check_labels([10], 1, 10)
    with pytest.raises(UserError, match="2 labels given for 3"):
        check_labels([1, 2], 3, 10)
    with pytest.raises(UserError, match="unconditional"):
        check_labels([1], 1, 0)


def test_cfg_combine_is_the_guidance_formula():
    gen = torch.Generator().manual_seed(0)
    eps_c, eps_u = torch.randn(2, 1, 3, 3, generator=gen), torch.randn(2, 1, 3, 3, generator=gen)
    for w in (0.0, 1.0, 2.5, 7.5):
        torch.testing.assert_close(cfg_combine(eps_c, eps_u, w), (1 - w) * eps_u + w * eps_c)
    with pytest.raises(ValueError, match="differ"):
        cfg_combine(eps_c, eps_u[:1], 2.0)


def test_prompt_loop_handles_bad_entries_and_end_of_input():
    lines = iter(["3", "", "  Seven ", "nonsense", "grid", "12"])
    out, drawn = [], []

    def read():
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    count = prompt_loop(read, lambda k: drawn.append(k) or f"class {k}", lambda: drawn.append("grid") or "grid",
                        out.append)
    assert drawn == [3, 7, "grid"] and count == 3
    assert any(line.startswith("error: cannot read 'nonsense'") for line in out)
    assert any("'12'" in line for line in out)
    assert out[-1] == "bye"


def test_prompt_loop_quit_and_drawing_errors():
    lines = iter(["1", "QUIT", "2"])
    out = []

    def fail(k):
        raise UserError(f"class {k} failed")

    assert prompt_loop(lambda: next(lines), fail, lambda: "grid", out.append) == 0
    assert "error: class 1 failed" in out and out[-1] == "bye"
