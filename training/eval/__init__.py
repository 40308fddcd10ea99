"""Evaluation: greedy generation, Rouge-L / exact-match scoring and the continual-learning metrics.

from training.eval import evaluate_tasks, continual_metrics
scores = evaluate_tasks(model, tokenizer, tasks, cfg.data.prompt_format, cfg.data.max_length, cfg.eval)
metrics = continual_metrics(score_matrix, single)  # rouge, forget_rate, backward, forward (authors' scorer)
"""

from training.eval.continual import (
    CONVENTIONS,
    DEFAULT_CONVENTION,
    average_score,
    backward_transfer,
    continual_metrics,
    forgetting_rate,
    forward_transfer,
    mixed_forward,
)
from training.eval.generate import evaluate_tasks, generate_predictions
from training.eval.scoring import TaskScore, exact_match, normalize_answer, rouge_l, score_task

__all__ = [
    "CONVENTIONS",
    "DEFAULT_CONVENTION",
    "TaskScore",
    "average_score",
    "backward_transfer",
    "continual_metrics",
    "evaluate_tasks",
    "exact_match",
    "forgetting_rate",
    "forward_transfer",
    "generate_predictions",
    "mixed_forward",
    "normalize_answer",
    "rouge_l",
    "score_task",
]
