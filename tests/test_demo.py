"""scripts/demo.py's held-out check: the printed score counts exact answers and tells a constant answer
(what the base model and an undertrained adapter give) from skill."""

from __future__ import annotations

import pytest

from tests.support.script_modules import load_script


def test_held_out_score_counts_exact_answers_and_the_constant_baseline() -> None:
    demo = load_script("demo.py", "badit_demo")
    score = demo.score_held_out([" POS", "NEG", "POS\n", "NEG", "POS."], ["POS", "POS", "POS", "NEG", "NEG"])
    assert (score.right, score.total, score.majority) == (3, 5, 3)
    assert score.answers == {"POS": 2, "NEG": 2, "POS.": 1}
    line = score.line("sst2 test sentences")
    assert "3 of 5 sst2 test sentences right" in line and "a constant answer gets at most 3" in line


def test_held_out_score_calls_one_answer_to_everything_no_skill() -> None:
    demo = load_script("demo.py", "badit_demo")
    score = demo.score_held_out(["POS"] * 4, ["POS", "POS", "POS", "NEG"])
    assert score.right == 3 and "one answer to every sentence: no skill shown" in score.line("x")
    with pytest.raises(ValueError, match="2 answers for 3 references"):
        demo.score_held_out(["POS", "NEG"], ["POS", "NEG", "POS"])
