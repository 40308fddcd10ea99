"""Small training runs through the CLI: the overrides, an interrupting hook and the CLI call that the
training, checkpoint and fault tests share."""

from __future__ import annotations

from pathlib import Path

from training.cli.train import main as train_main
from training.hooks import TrainerHook, TrainState

TASKS = [
    "task363_sst2_polarity_classification",
    "task073_commonsenseqa_answer_generation",
    "task1290_xsum_summarization",
]


def train_overrides(model_dir: Path, superni_dir: Path, out: Path, **extra: object) -> list[str]:
    base = {
        "model.name_or_path": str(model_dir),
        "data.superni_dir": str(superni_dir),
        "data.tasks": "[" + ", ".join(TASKS[:2]) + "]",
        "data.max_train_per_task": 6,
        "data.max_test_per_task": 2,
        "data.max_length": 256,
        "data.max_target_tokens": 8,
        "adapter.rank": 2,
        "train.batch_size": 2,
        "train.max_steps": 3,
        "train.lr": 0.01,
        "eval.max_new_tokens": 4,
        "eval.batch_size": 4,
        "output.dir": str(out),
        "output.log_every": 1,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


class InterruptAfter(TrainerHook):
    """Test-only hook: a KeyboardInterrupt right after global step `step` (after its checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, state: TrainState) -> None:
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"interrupted after step {state.global_step} (test hook)")


def train_cli(overrides: list[str], *flags: str) -> int:
    args = ["--no-progress", *flags]
    for item in overrides:
        args += ["--set", item]
    return train_main(args)


RESUME_OVERRIDES = {
    "train.max_steps": 6,
    "output.checkpoint_every": 1,
    "adapter.dropout": 0.1,
    "eval.enabled": "false",
    "adapter.dog.schedule": "every_n_steps",
    "adapter.dog.every_n_steps": 4,
}
"""A short run with a checkpoint every step, dropout and a DOG regroup: what the kill-and-resume tests run."""
