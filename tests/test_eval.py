"""Scoring, continual-learning metrics and batched greedy generation on a tiny random model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from training.config import EvalConfig
from training.data import Instance, Task, encode_eval_prompt
from training.eval import (
    average_score,
    backward_transfer,
    continual_metrics,
    evaluate_tasks,
    exact_match,
    forgetting_rate,
    forward_transfer,
    generate_predictions,
    mixed_forward,
    rouge_l,
    score_task,
)

# ------------------------------------------------------------------------------------------------ scoring


def test_rouge_l_identical_and_disjoint() -> None:
    assert rouge_l("the cat sat on the mat", ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert rouge_l("alpha beta", ["gamma delta"]) == 0.0
    assert rouge_l("", ["gamma delta"]) == 0.0


def test_rouge_l_partial_is_f1_in_percent() -> None:
    # LCS("a b c d", "a b x y") = 2 tokens: P = R = 2/4, F1 = 0.5 -> 50.
    assert rouge_l("a b c d", ["a b x y"]) == pytest.approx(50.0)


def test_rouge_l_takes_best_reference() -> None:
    best = rouge_l("a b c d", ["zzz", "a b x y", "q"])
    assert best == pytest.approx(50.0)
    assert rouge_l("a b c d", ["zzz", "a b c d"]) == pytest.approx(100.0)


def test_rouge_l_stems() -> None:
    assert rouge_l("running", ["run"]) == pytest.approx(100.0)
    assert rouge_l("The dogs were running", ["the dog was run"]) > rouge_l(
        "The cats sat", ["the dog was run"]
    )


def test_scores_reject_missing_references() -> None:
    with pytest.raises(ValueError, match="at least one reference"):
        rouge_l("x", [])
    with pytest.raises(TypeError, match="single string"):
        exact_match("x", "x")


def test_exact_match_normalisation() -> None:
    assert exact_match("The  Answer!", ["answer"]) == 100.0
    assert exact_match("an apple, please.", ["Apple please"]) == 100.0
    assert exact_match("answers", ["answer"]) == 0.0
    assert exact_match("no", ["maybe", "No."]) == 100.0


def test_score_task_means_and_checks() -> None:
    insts = [Instance("t", "1", "in", ("yes",)), Instance("t", "2", "in", ("a b x y",))]
    score = score_task(["Yes.", "a b c d"], insts)
    assert (score.task, score.count) == ("t", 2)
    assert score.rouge_l == pytest.approx((100.0 + 50.0) / 2)
    assert score.exact_match == pytest.approx(50.0)
    assert score.ids == ["1", "2"] and score.predictions == ["Yes.", "a b c d"]
    assert score.summary() == {"task": "t", "rouge_l": score.rouge_l, "exact_match": 50.0, "count": 2}
    with pytest.raises(ValueError, match="1 predictions for 2 instances"):
        score_task(["x"], insts)
    with pytest.raises(ValueError, match="no instances"):
        score_task([], [])


# ------------------------------------------------------------------------------------- continual metrics

# a[j][i] = score on task i after stage j (task i is trained in stage i).
A = [
    [50.0, 10.0, 5.0],
    [52.0, 60.0, 8.0],
    [30.0, 55.0, 70.0],
]
SINGLE = [45.0, 58.0, 65.0]


def test_average_score_hand_worked() -> None:
    # Rouge = (30 + 55 + 70) / 3 = 155 / 3
    assert average_score(A) == pytest.approx(155.0 / 3)


def test_forgetting_rate_hand_worked() -> None:
    # task 0: peak over stages 0..1 = max(50, 52) = 52, final 30 -> 22
    # task 1: peak over stages 0..1 = max(10, 60) = 60, final 55 -> 5  (stage 0 is before task 1 trained)
    # Forget Rate = (22 + 5) / 2 = 13.5 under both conventions here
    assert forgetting_rate(A) == pytest.approx(13.5)
    assert forgetting_rate(A, "gem") == pytest.approx(13.5)


# B: as A, but task 1 scored 62 after stage 0, before it was trained (transfer from task 0).
B = [
    [50.0, 62.0, 5.0],
    [52.0, 60.0, 8.0],
    [30.0, 55.0, 70.0],
]


def test_forgetting_rate_conventions_hand_worked() -> None:
    # authors (parse_scores.py): peak over every earlier stage.
    #   task 0: max(50, 52) - 30 = 22;  task 1: max(62, 60) - 55 = 7   -> (22 + 7) / 2 = 14.5
    assert forgetting_rate(B) == pytest.approx(14.5)
    assert forgetting_rate(B, "authors") == pytest.approx(14.5)
    # gem: peak once learned.  task 0: 22;  task 1: max(60) - 55 = 5   -> (22 + 5) / 2 = 13.5
    assert forgetting_rate(B, "gem") == pytest.approx(13.5)
    # gem never reads the entries above the diagonal, so they may be NaN
    nan = [row[:] for row in B]
    nan[0][1] = nan[0][2] = nan[1][2] = math.nan
    assert forgetting_rate(nan, "gem") == pytest.approx(13.5)


def test_backward_transfer_conventions_hand_worked() -> None:
    # authors: over all 3 tasks, / 3:  ((30 - 50) + (55 - 60) + (70 - 70)) / 3 = -25 / 3
    assert backward_transfer(A) == pytest.approx(-25.0 / 3)
    assert backward_transfer(B, "authors") == pytest.approx(-25.0 / 3)
    # gem: over the 2 earlier tasks, / 2:  ((30 - 50) + (55 - 60)) / 2 = -12.5
    assert backward_transfer(A, "gem") == pytest.approx(-12.5)


def test_authors_scorer_formulas_on_a_four_task_matrix() -> None:
    """The released scorer's loops, written out by hand for T = 4 (Fgt over t < 3 of max(col[:3]) - last)."""
    a = [
        [40.0, 20.0, 30.0, 10.0],
        [35.0, 50.0, 25.0, 12.0],
        [45.0, 41.0, 60.0, 14.0],
        [33.0, 44.0, 52.0, 70.0],
    ]
    # Fgt: task 0 max(40, 35, 45) - 33 = 12; task 1 max(20, 50, 41) - 44 = 6; task 2 max(30, 25, 60) - 52 = 8
    assert forgetting_rate(a) == pytest.approx((12 + 6 + 8) / 3)
    # Bwt: ((33 - 40) + (44 - 50) + (52 - 60) + (70 - 70)) / 4 = -21 / 4
    assert backward_transfer(a) == pytest.approx(-21.0 / 4)
    # Cl: (33 + 44 + 52 + 70) / 4;  Fwt: mean diagonal - mean single = (40 + 50 + 60 + 70) / 4 - 45
    single = [44.0, 46.0, 45.0, 45.0]
    assert continual_metrics(a, single) == pytest.approx(
        {"rouge": 199.0 / 4, "forget_rate": 26.0 / 3, "backward": -21.0 / 4, "forward": 220.0 / 4 - 45.0}
    )


def test_unknown_convention_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown metric convention 'chaudhry'.*authors.*gem"):
        continual_metrics(A, convention="chaudhry")


def test_forward_transfer_hand_worked() -> None:
    # ((50 - 45) + (60 - 58) + (70 - 65)) / 3 = 12 / 3 = 4
    assert forward_transfer(A, SINGLE) == pytest.approx(4.0)
    # mixed: final row vs single: ((30 - 45) + (55 - 58) + (70 - 65)) / 3 = -13 / 3
    assert mixed_forward(A[2], SINGLE) == pytest.approx(-13.0 / 3)


def test_continual_metrics_bundle() -> None:
    assert continual_metrics(A) == pytest.approx(
        {"rouge": 155.0 / 3, "forget_rate": 13.5, "backward": -25.0 / 3}
    )
    full = continual_metrics(A, SINGLE, "gem")
    assert full == pytest.approx({"rouge": 155.0 / 3, "forget_rate": 13.5, "backward": -12.5, "forward": 4.0})
    # one stage (mixed training): forward = mixed forward, no forgetting terms
    assert continual_metrics([[40.0]], [30.0]) == pytest.approx({"rouge": 40.0, "forward": 10.0})


def test_continual_metrics_errors() -> None:
    with pytest.raises(ValueError, match="empty"):
        continual_metrics([])
    with pytest.raises(ValueError, match="square"):
        continual_metrics([[1.0, 2.0], [3.0]])
    with pytest.raises(ValueError, match="square"):
        average_score([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    with pytest.raises(ValueError, match="2 scores for 3 tasks"):
        continual_metrics(A, [1.0, 2.0])
    with pytest.raises(ValueError, match="at least 2 stages"):
        forgetting_rate([[1.0]])
    with pytest.raises(ValueError, match="at least 2 stages"):
        backward_transfer([[1.0]])
    with pytest.raises(ValueError, match="2 scores for 3 tasks"):
        mixed_forward([1.0, 2.0, 3.0], [1.0, 2.0])


# ------------------------------------------------------------------------------------------- generation

TEXTS = [
    "Translate to French: good morning, my friend",
    "Hi",
    "Summarise: the quick brown fox jumps over the lazy dog while the cat watches from the fence post",
    "What is two plus two?",
    "A list of fruit: apple, banana, cherry, date, elderberry, fig",
]


@pytest.fixture(scope="module")
def llama(tiny_model_dirs: dict[str, Path]) -> tuple[torch.nn.Module, AutoTokenizer]:
    model_dir = tiny_model_dirs["llama"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def _prompts(tokenizer) -> list[list[int]]:
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    assert len({len(p) for p in prompts}) == len(prompts), "prompt lengths must differ to exercise padding"
    return prompts


def _greedy_ids(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """Plain unbatched greedy decoding with full re-computation (no cache, no padding): the reference."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            next_id = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return ids[0, len(prompt) :].tolist()


def test_batched_left_padded_matches_one_at_a_time(llama) -> None:
    model, tok = llama
    prompts = _prompts(tok)
    kwargs = dict(
        max_new_tokens=8, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, progress=False
    )
    batched = generate_predictions(model, tok, prompts, batch_size=5, **kwargs)
    in_twos = generate_predictions(model, tok, prompts, batch_size=2, **kwargs)
    singles = [generate_predictions(model, tok, [p], batch_size=1, **kwargs)[0] for p in prompts]
    assert batched == singles
    assert in_twos == singles
    assert len(set(singles)) > 1, "distinct prompts should give distinct continuations"
    # and equal to a plain no-cache greedy loop, in the original prompt order
    for prompt, text in zip(prompts, singles, strict=True):
        ids = _greedy_ids(model, prompt, 8)
        if tok.eos_token_id in ids:
            ids = ids[: ids.index(tok.eos_token_id)]
        assert text == tok.decode(ids, skip_special_tokens=True).strip()


def test_generation_restores_mode(llama) -> None:
    model, tok = llama
    prompts = _prompts(tok)[:2]
    kwargs = dict(
        max_new_tokens=2, batch_size=2, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    model.train()
    try:
        generate_predictions(model, tok, prompts, progress=False, **kwargs)
        assert model.training
    finally:
        model.eval()
    generate_predictions(model, tok, prompts, progress=False, **kwargs)
    assert not model.training
    with pytest.raises(ValueError, match="empty"):
        generate_predictions(model, tok, [prompts[0], []], progress=False, **kwargs)


def test_generation_stops_at_eos(llama) -> None:
    model, tok = llama
    prompt = _prompts(tok)[2]
    greedy = _greedy_ids(model, prompt, 6)
    kwargs = dict(max_new_tokens=6, batch_size=1, pad_token_id=tok.pad_token_id, progress=False)
    # eos = the first greedy token: nothing is generated before it
    assert generate_predictions(model, tok, [prompt], eos_token_id=greedy[0], **kwargs) == [""]
    # eos = a later greedy token: the text stops just before its first occurrence
    k = next(k for k in range(1, 6) if greedy[k] not in greedy[:k])
    expected = tok.decode(greedy[:k], skip_special_tokens=True).strip()
    assert generate_predictions(model, tok, [prompt], eos_token_id=greedy[k], **kwargs) == [expected]


def _task(name: str, inputs: list[str], refs: list[str]) -> Task:
    test = [Instance(name, f"{name}-{k}", x, (r,)) for k, (x, r) in enumerate(zip(inputs, refs, strict=True))]
    return Task(name, f"Answer the {name} question.", [], test, Path("."))


def test_evaluate_tasks(llama) -> None:
    model, tok = llama
    cfg = EvalConfig(max_new_tokens=5, batch_size=2)
    tasks = [_task("alpha", TEXTS[:3], ["good", "hello", "fox"]), _task("beta", TEXTS[3:], ["four", "fig"])]
    scores = evaluate_tasks(model, tok, tasks, "chat", 256, cfg, progress=False)
    assert list(scores) == ["alpha", "beta"]
    assert [scores[t.name].count for t in tasks] == [3, 2]
    assert scores["beta"].ids == ["beta-0", "beta-1"]
    for task in tasks:
        prompts = [encode_eval_prompt(tok, task, inst, "chat", 256, 5) for inst in task.test]
        expected = generate_predictions(
            model, tok, prompts, 5, 1, tok.eos_token_id, tok.pad_token_id, progress=False
        )
        assert scores[task.name].predictions == expected
        assert scores[task.name].rouge_l == pytest.approx(score_task(expected, task.test).rouge_l)
    # references equal to the predictions: every instance matches exactly
    echo = [_task(t.name, [i.input for i in t.test], scores[t.name].predictions) for t in tasks]
    assert all(
        s.exact_match == 100.0
        for s in evaluate_tasks(model, tok, echo, "chat", 256, cfg, progress=False).values()
    )
    with pytest.raises(ValueError, match="no test instances"):
        evaluate_tasks(model, tok, [Task("empty", "d", [], [], Path("."))], "chat", 256, cfg, progress=False)
