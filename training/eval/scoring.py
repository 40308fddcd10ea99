"""Per-instance and per-task scores: Rouge-L (the paper's metric) and exact match, both in percent.

Rouge-L follows SuperNI's official scorer: rouge-score's `rougeL` F1 with the Porter stemmer and its default
English tokenizer (lowercase, non-alphanumerics dropped), best over the instance's references. Exact match
uses SQuAD-style normalisation (lowercase, drop punctuation and the articles a/an/the, collapse whitespace).
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field

from rouge_score import rouge_scorer

from training.data.superni import Instance

_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def _check_references(references: Sequence[str]) -> None:
    if isinstance(references, str):
        raise TypeError("references must be a sequence of strings, not a single string")
    if not references:
        raise ValueError("at least one reference is needed to score a prediction")


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """Best Rouge-L F1 of `prediction` over `references`, in percent (0-100)."""
    _check_references(references)
    return 100.0 * max(float(_SCORER.score(ref, prediction)["rougeL"].fmeasure) for ref in references)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, strip punctuation and articles, collapse whitespace."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """100 if the normalised prediction equals any normalised reference, else 0."""
    _check_references(references)
    target = normalize_answer(prediction)
    return 100.0 if any(normalize_answer(ref) == target for ref in references) else 0.0


@dataclass
class TaskScore:
    """Mean scores of one task's test instances (percent), with the predictions that produced them."""

    task: str
    rouge_l: float
    exact_match: float
    count: int
    ids: list[str] = field(default_factory=list, repr=False)
    """Instance ids, in the task's test order."""
    predictions: list[str] = field(default_factory=list, repr=False)
    """Generated text per instance, aligned with `ids`."""

    def summary(self) -> dict[str, str | float | int]:
        """The compact form (no ids or predictions), e.g. for a scores JSON."""
        return {
            "task": self.task,
            "rouge_l": self.rouge_l,
            "exact_match": self.exact_match,
            "count": self.count,
        }


def score_task(predictions: list[str], instances: Sequence[Instance]) -> TaskScore:
    """Mean Rouge-L and exact match of `predictions` against the aligned `instances` of one task."""
    if len(predictions) != len(instances):
        raise ValueError(f"{len(predictions)} predictions for {len(instances)} instances")
    if not instances:
        raise ValueError("cannot score a task with no instances")
    names = {inst.task for inst in instances}
    if len(names) != 1:
        raise ValueError(f"instances of one task expected, got tasks {sorted(names)}")
    pairs = list(zip(predictions, instances, strict=True))
    return TaskScore(
        task=instances[0].task,
        rouge_l=sum(rouge_l(p, inst.references) for p, inst in pairs) / len(pairs),
        exact_match=sum(exact_match(p, inst.references) for p, inst in pairs) / len(pairs),
        count=len(pairs),
        ids=[inst.id for inst in instances],
        predictions=list(predictions),
    )
