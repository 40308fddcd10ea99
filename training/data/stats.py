"""Per-task counts and token-length percentiles of SuperNI data under a tokenizer and prompt format."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from training.data.prompts import PromptFormat, build_prompt, choose_reference
from training.data.superni import Task


@dataclass(frozen=True)
class Lengths:
    """Nearest-rank percentiles of token lengths (all 0 for no values)."""

    p50: int
    p90: int
    p99: int
    max: int


@dataclass(frozen=True)
class TaskStats:
    """Counts and lengths of one task (or of all tasks, for the totals row)."""

    task: str
    train: int
    """Training instances in the file, blank-output ones included."""
    test: int
    """Test instances in the file, blank-output ones included."""
    empty: int
    """Instances dropped for a blank output (train + test)."""
    inputs_cut: int
    """Training instances whose input would be cut at max_length (with the chosen reference)."""
    prompt: Lengths
    """Untruncated prompt tokens over train + test instances."""
    response: Lengths
    """Tokens of every reference of every instance (without eos)."""


@dataclass(frozen=True)
class DataStats:
    """Per-task rows, the totals row and the settings they were computed under."""

    tasks: list[TaskStats]
    total: TaskStats
    fmt: str
    max_length: int
    max_target_tokens: int


def percentile(values: Sequence[int], q: float) -> int:
    """Nearest-rank q-th percentile (0 < q <= 100) of `values`; 0 when empty."""
    if not values:
        return 0
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


def summarize(values: Sequence[int]) -> Lengths:
    """p50 / p90 / p99 / max of `values`."""
    return Lengths(
        percentile(values, 50), percentile(values, 90), percentile(values, 99), max(values, default=0)
    )


def compute_stats(
    tasks: Sequence[Task],
    tokenizer: PreTrainedTokenizerBase,
    fmt: PromptFormat,
    max_length: int = 1024,
    max_target_tokens: int = 50,
    reference_seed: int = 0,
) -> DataStats:
    """Count instances and measure prompt / response token lengths (batch-tokenized per task)."""
    rows: list[TaskStats] = []
    all_prompts: list[int] = []
    all_responses: list[int] = []
    for task in tasks:
        instances = task.train + task.test
        prompts = [build_prompt(tokenizer, task.definition, inst.input, fmt) for inst in instances]
        prompt_lens = [len(ids) for ids in _batch_ids(tokenizer, prompts)]  # (N,)
        refs = [ref for inst in instances for ref in inst.references]
        ref_lens = [len(ids) for ids in _batch_ids(tokenizer, refs)]  # (sum of references,)
        cut, offset = 0, 0
        for i, inst in enumerate(task.train):
            chosen = ref_lens[offset + choose_reference(inst, reference_seed)]
            cut += prompt_lens[i] + min(chosen, max_target_tokens - 1) + 1 > max_length
            offset += len(inst.references)
        rows.append(
            TaskStats(
                task=task.name,
                train=len(task.train) + len(task.skipped_train),
                test=len(task.test) + len(task.skipped_test),
                empty=len(task.skipped_train) + len(task.skipped_test),
                inputs_cut=cut,
                prompt=summarize(prompt_lens),
                response=summarize(ref_lens),
            )
        )
        all_prompts += prompt_lens
        all_responses += ref_lens
    total = TaskStats(
        task="total",
        train=sum(r.train for r in rows),
        test=sum(r.test for r in rows),
        empty=sum(r.empty for r in rows),
        inputs_cut=sum(r.inputs_cut for r in rows),
        prompt=summarize(all_prompts),
        response=summarize(all_responses),
    )
    return DataStats(rows, total, fmt, max_length, max_target_tokens)


def format_table(stats: DataStats) -> str:
    """A plain-text table: one row per task, then the totals row."""
    width = max([len(r.task) for r in stats.tasks] + [len("task")])
    head = (
        f"{'task':<{width}} {'train':>7} {'test':>6} {'empty':>5} {'cut':>5}  "
        f"{'prompt p50':>10} {'p90':>5} {'p99':>5} {'max':>6}  {'resp p50':>8} {'p90':>5} {'p99':>5} {'max':>5}"
    )

    def line(r: TaskStats) -> str:
        p, q = r.prompt, r.response
        return (
            f"{r.task:<{width}} {r.train:>7,} {r.test:>6,} {r.empty:>5,} {r.inputs_cut:>5,}  "
            f"{p.p50:>10} {p.p90:>5} {p.p99:>5} {p.max:>6}  {q.p50:>8} {q.p90:>5} {q.p99:>5} {q.max:>5}"
        )

    rule = "-" * len(head)
    notes = (
        f"format {stats.fmt}; lengths in tokens (prompt untruncated, response = every reference, no eos); "
        f"empty = blank-output instances dropped; cut = training inputs cut at max_length {stats.max_length} "
        f"with max_target_tokens {stats.max_target_tokens}"
    )
    return "\n".join([head, rule, *(line(r) for r in stats.tasks), rule, line(stats.total), notes])


def _batch_ids(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    ids: list[list[int]] = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return ids
