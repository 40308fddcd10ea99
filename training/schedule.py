"""Step counts, learning-rate schedules and the DOG regroup schedule."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from training.adapters.config import DogConfig
from training.config import TrainConfig


def steps_per_epoch(num_examples: int, cfg: TrainConfig) -> int:
    """Optimiser steps in one pass (the last step may be short)."""
    return max(1, math.ceil(num_examples / (cfg.batch_size * cfg.grad_accum)))


def total_steps(num_examples: int, cfg: TrainConfig) -> int:
    """Optimiser steps of one stage: epochs x steps per epoch, capped by max_steps."""
    steps = max(1, math.ceil(cfg.epochs * steps_per_epoch(num_examples, cfg)))
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


def lr_lambda(cfg: TrainConfig, total: int) -> Callable[[int], float]:
    """Multiplier of the peak lr at each step: linear warmup then cosine/linear/constant decay."""
    warmup = int(round(cfg.warmup_ratio * total))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if cfg.scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total))


def regroup_due(step: int, total: int, per_epoch: int, dog: DogConfig) -> bool:
    """Whether to regroup after optimiser step `step` (1-based) of a stage with `total` steps.

    every_n_steps: at multiples of N (not at the very last step, where it could no longer matter);
    epoch_first_half: at the end of each epoch that ends within the first half of training.
    """
    if step >= total:
        return False
    if dog.schedule == "every_n_steps":
        return step % dog.every_n_steps == 0
    return step % per_epoch == 0 and step <= total / 2
