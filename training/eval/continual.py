"""Continual-learning metrics of the paper (Appendix G.5): Rouge, Forward, Forget Rate, Backward.

Notation: T tasks are trained in T stages, task i in stage i (0-based, training order). `a[j][i]` is the
score (Rouge-L, percent) on task i after stage j; row j = one evaluation of every task after stage j.
`single[i]` is the score of task i when trained alone.

Two conventions, picked by name (`CONVENTIONS`); they differ in Forget Rate and Backward only:
  "authors" (default): the authors' released scorer (repository wangbing1416/BADIT, src/parse_scores.py),
    so numbers compare with the paper's tables. Forget's peak runs over every earlier stage j in [0, T-2],
    including stages before task i was trained (so every a[j][i] must be given); Backward sums over all T
    tasks (the last term is 0) and divides by T.
  "gem": GEM (Lopez-Paz & Ranzato, 2017) / SAPT as usually written. Forget's peak runs over j in [i, T-2],
    once task i was learned; Backward averages over the T-1 earlier tasks. Entries a[j][i] with j < i
    are never read and may be NaN.

Paper prose (G.5, its math was lost in extraction):
  Rouge: "measures the overall effectiveness after learning the entire sequence of tasks".
  Forward: "quantifies how much prior knowledge acquired from previously seen tasks helps (or hinders) the
    learning of a new task. It is measured relative to a baseline where each task is learned in isolation."
  Forget Rate: "captures the performance drop from the peak (after learning [the j]-th task) to the end
    (after learning all tasks)".
  Backward: "measures the influence of learning subsequent tasks on the performance of earlier tasks";
    "can be positive if later tasks improve earlier ones".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Matrix = Sequence[Sequence[float]]
ConventionName = Literal["authors", "gem"]


@dataclass(frozen=True)
class Convention:
    """How Forget Rate and Backward read the score matrix."""

    peak_from_first_stage: bool
    """Forget's peak over every earlier stage (True), or only from the stage that learned the task."""
    backward_over_all_tasks: bool
    """Backward sums a[T-1][i] - a[i][i] over all T tasks and divides by T (True), or over the T-1 earlier."""


CONVENTIONS: dict[str, Convention] = {
    "authors": Convention(peak_from_first_stage=True, backward_over_all_tasks=True),
    "gem": Convention(peak_from_first_stage=False, backward_over_all_tasks=False),
}
DEFAULT_CONVENTION: ConventionName = "authors"


def resolve_convention(name: str) -> Convention:
    """The named convention; ValueError naming the known ones otherwise."""
    if name not in CONVENTIONS:
        raise ValueError(f"unknown metric convention {name!r}; known: {sorted(CONVENTIONS)}")
    return CONVENTIONS[name]


def _size(a: Matrix) -> int:
    """T of a square T x T score matrix; ValueError otherwise."""
    if len(a) == 0:
        raise ValueError("score matrix is empty; need one row per training stage")
    size = len(a)
    for j, row in enumerate(a):
        if len(row) != size:
            raise ValueError(
                f"score matrix must be square (T stages x T tasks): row {j} has {len(row)} entries, T = {size}"
            )
    return size


def _need_two_stages(size: int, name: str) -> None:
    if size < 2:
        raise ValueError(
            f"{name} needs at least 2 stages (it averages over the T-1 earlier tasks), got T = {size}"
        )


def _check_single(single: Sequence[float], size: int) -> None:
    if len(single) != size:
        raise ValueError(f"single has {len(single)} scores for {size} tasks")


def average_score(a: Matrix) -> float:
    """Rouge = (1/T) * sum_{i=0}^{T-1} a[T-1][i]: the mean score over all tasks after the last stage."""
    size = _size(a)
    return sum(a[size - 1]) / size


def forgetting_rate(a: Matrix, convention: ConventionName = DEFAULT_CONVENTION) -> float:
    """Forget Rate = (1/(T-1)) * sum_{i=0}^{T-2} (max_{j in [j0, T-2]} a[j][i] - a[T-1][i]).

    The drop of each earlier task from its peak to its final score, averaged over the T-1 tasks before
    the last; higher means more forgetting. j0 = 0 under "authors" (parse_scores.py: the peak over every
    earlier stage, including those before task i was trained; Chaudhry et al., 2018, as written), j0 = i
    under "gem" (the peak once task i was learned).
    """
    size = _size(a)
    _need_two_stages(size, "Forget Rate")
    rule = resolve_convention(convention)
    total = 0.0
    for i in range(size - 1):
        first = 0 if rule.peak_from_first_stage else i
        peak = max(a[j][i] for j in range(first, size - 1))
        total += peak - a[size - 1][i]
    return total / (size - 1)


def backward_transfer(a: Matrix, convention: ConventionName = DEFAULT_CONVENTION) -> float:
    """Backward = (1/n) * sum_{i<n} (a[T-1][i] - a[i][i]): final score minus the score right after learning.

    n = T under "authors" (parse_scores.py sums over every task, the last contributing 0), n = T-1 under
    "gem" (GEM's BWT over the earlier tasks). Negative means forgetting, positive means later tasks helped.
    """
    size = _size(a)
    _need_two_stages(size, "Backward")
    count = size if resolve_convention(convention).backward_over_all_tasks else size - 1
    return sum(a[size - 1][i] - a[i][i] for i in range(count)) / count


def forward_transfer(a: Matrix, single: Sequence[float]) -> float:
    """Forward (sequential) = (1/T) * sum_{i=0}^{T-1} (a[i][i] - single[i]).

    Score of each task right after it is learned (with the previous tasks behind it) minus its score
    when trained alone, averaged over all T tasks (SAPT's FWT, as G.5 describes: relative to isolated
    training). Positive means earlier tasks helped.
    """
    size = _size(a)
    _check_single(single, size)
    return sum(a[i][i] - single[i] for i in range(size)) / size


def mixed_forward(final: Sequence[float], single: Sequence[float]) -> float:
    """Forward (mixed) = (1/T) * sum_{i=0}^{T-1} (final[i] - single[i]).

    Mixed training is one stage, so a[i][i] is the final score: the mean gain of multi-task training over
    training each task alone (= Rouge - mean(single), which is why Table 1's mixed Forward shares Rouge's
    standard deviation).
    """
    if len(final) == 0:
        raise ValueError("final scores are empty")
    _check_single(single, len(final))
    return sum(f - s for f, s in zip(final, single, strict=True)) / len(final)


def continual_metrics(
    a: Matrix, single: Sequence[float] | None = None, convention: ConventionName = DEFAULT_CONVENTION
) -> dict[str, float]:
    """{'rouge', 'forget_rate', 'backward'} of a T x T score matrix, plus 'forward' when `single` is given.

    'forget_rate' and 'backward' need T >= 2 and are left out for a single stage (T = 1), where 'forward'
    equals `mixed_forward(a[0], single)`. `convention` picks how they read the matrix (module doc).
    """
    size = _size(a)
    resolve_convention(convention)
    if single is not None:
        _check_single(single, size)
    metrics = {"rouge": average_score(a)}
    if size >= 2:
        metrics["forget_rate"] = forgetting_rate(a, convention)
        metrics["backward"] = backward_transfer(a, convention)
    if single is not None:
        metrics["forward"] = forward_transfer(a, single)
    return metrics
