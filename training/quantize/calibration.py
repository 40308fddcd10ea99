"""Calibration samples for the quantiser: SuperNI training instances, rendered as the model is trained on
them (chat prompt + reference + eos, `encode_train`), taken round-robin over the tasks in file order, each cut to the calibration length."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from training.config import DataConfig
from training.data.prompts import encode_train
from training.data.superni import list_tasks, load_task, require_superni_dir

FULL_LENGTH = 16384
"""Token budget a sample is rendered in before the cut (the longest SuperNI-15 instance is far shorter)."""


@dataclass(frozen=True)
class CalibrationSet:
    tasks: list[str]
    rows: list[list[int]]
    """(samples,) token ids of each sample, each at most max_length."""
    max_length: int

    @property
    def tokens(self) -> int:
        return sum(map(len, self.rows))

    def write_jsonl(self, path: Path) -> None:
        """One `{"input_ids": [...]}` per line: what `llmc_worker` reads."""
        path.write_text("".join(json.dumps({"input_ids": ids}) + "\n" for ids in self.rows))


def superni_calibration(
    tokenizer: PreTrainedTokenizerBase,
    superni_dir: Path | None,
    samples: int,
    max_length: int,
    tasks: list[str] | None = None,
) -> CalibrationSet:
    """`samples` training instances of `tasks` (default: every task of `superni_dir`), alternating tasks."""
    root = require_superni_dir(superni_dir)
    names = tasks or list_tasks(root)
    per_task = -(-samples // len(names))  # ceil
    # Rendered whole, then cut to max_length: a calibration sample needs no answer at its end, and an
    # instruction longer than max_length (training refuses it) still calibrates on its first tokens.
    data = DataConfig(superni_dir=root, tasks=names, max_length=FULL_LENGTH)
    loaded = [load_task(root, name, max_train=per_task) for name in names]
    rows: list[list[int]] = []
    for i in range(per_task):
        for task in loaded:
            if len(rows) < samples and i < len(task.train):
                rows.append(encode_train(tokenizer, task, task.train[i], data).input_ids[:max_length])
    return CalibrationSet(names, rows, max_length)
