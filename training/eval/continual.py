"""Continual-learning metrics of the paper (Appendix G.5): Rouge, Forward, Forget Rate, Backward.

Notation: T tasks are trained in T stages, task i in stage i (0-based, training order). `a[j][i]` is the
score (Rouge-L, percent) on task i after stage j; row j = one evaluation of every task after stage j.
`single[i]` is the score of task i when trained alone. Entries a[j][i] with j < i (tasks not yet trained)
are never read unless `forgetting_rate(..., peak_from_start=True)`; they may be NaN.

Paper prose (G.5, its math was lost in extraction), following GEM (Lopez-Paz & Ranzato, 2017) and SAPT
(Zhao et al., 2024):
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

Matrix = Sequence[Sequence[float]]


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


def forgetting_rate(a: Matrix, peak_from_start: bool = False) -> float:
    """Forget Rate = (1/(T-1)) * sum_{i=0}^{T-2} max_{j in [i, T-2]} (a[j][i] - a[T-1][i]).

    The drop of each earlier task from its best score after it was learned (stage i .. T-2) to its final
    score, averaged over the T-1 tasks before the last (GEM/SAPT forgetting; G.5: "the performance drop
    from the peak ... to the end"). Higher means more forgetting; it is >= -Backward. With
    `peak_from_start=True` the peak runs over every earlier stage, j in [0, T-2], including those before
    task i was trained (Chaudhry et al., 2018, as literally written); then a[j][i] must be given for j < i.
    """
    size = _size(a)
    _need_two_stages(size, "Forget Rate")
    total = 0.0
    for i in range(size - 1):
        first = 0 if peak_from_start else i
        peak = max(a[j][i] for j in range(first, size - 1))
        total += peak - a[size - 1][i]
    return total / (size - 1)


def backward_transfer(a: Matrix) -> float:
    """Backward = (1/(T-1)) * sum_{i=0}^{T-2} (a[T-1][i] - a[i][i]).

    Final score minus the score right after learning, averaged over the T-1 tasks before the last (GEM's
    BWT); negative means forgetting, positive means later tasks helped earlier ones.
    """
    size = _size(a)
    _need_two_stages(size, "Backward")
    return sum(a[size - 1][i] - a[i][i] for i in range(size - 1)) / (size - 1)


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


def continual_metrics(a: Matrix, single: Sequence[float] | None = None) -> dict[str, float]:
    """{'rouge', 'forget_rate', 'backward'} of a T x T score matrix, plus 'forward' when `single` is given.

    'forget_rate' and 'backward' need T >= 2 and are left out for a single stage (T = 1), where 'forward'
    equals `mixed_forward(a[0], single)`.
    """
    size = _size(a)
    if single is not None:
        _check_single(single, size)
    metrics = {"rouge": average_score(a)}
    if size >= 2:
        metrics["forget_rate"] = forgetting_rate(a)
        metrics["backward"] = backward_transfer(a)
    if single is not None:
        metrics["forward"] = forward_transfer(a, single)
    return metrics
