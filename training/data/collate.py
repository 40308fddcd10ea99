"""Pad tokenized examples into batches: right padding for training, left padding for generation."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from training.data.prompts import TrainExample
from training.loss import IGNORE_INDEX


def collate_train(examples: Sequence[TrainExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and `labels` (-100 on padding), each (B, T) int64."""
    if not examples:
        raise ValueError("collate_train needs at least one example")
    width = max(len(ex.input_ids) for ex in examples)  # T
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[row, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(ex.labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_prompts(prompts: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded `input_ids` and `attention_mask`, each (B, T) int64, for batched greedy generation."""
    if not prompts:
        raise ValueError("collate_prompts needs at least one prompt")
    width = max(len(p) for p in prompts)  # T
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        n = len(prompt)
        if n:
            input_ids[row, width - n :] = torch.tensor(list(prompt), dtype=torch.long)
            attention_mask[row, width - n :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}
