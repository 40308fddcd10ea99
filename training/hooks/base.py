"""The trainer's extension points: `TrainState` (what a hook sees) and `TrainerHook` (what it overrides).

A hook subclasses `TrainerHook` and overrides what it needs; the trainer calls every hook in order at

    on_stage_start       each stage's start (every sequential task boundary), before the optimiser is
                         built: add or freeze parameters here (O-LoRA / GainLoRA branches), reset signals
    extra_loss           each micro-batch: a per-step loss term (e.g. O-LoRA's orthogonality loss), added
                         as term / micro-batches so its gradient per optimiser step is that of the term
    before_optimizer     gradients are final (accumulated, all-reduced, clipped), weights not yet updated
    after_step           after the update and the step's metrics line, before the step's checkpoint
    on_step_end          after the step's checkpoint (tests install an interrupt here)
    on_stage_end         after the stage's last step

Hooks must behave identically on every data-parallel rank, except for logging.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from training.data import TrainExample
from training.distributed import World
from training.metrics_log import MetricsLog


@dataclass
class TrainState:
    """What hooks see of a training stage; the trainer updates it as it goes."""

    model: nn.Module
    examples: list[TrainExample]
    pad_id: int
    stage: int
    stage_name: str
    total: int
    """Optimiser steps of this stage."""
    per_epoch: int
    """Optimiser steps per pass over the stage's examples."""
    world: World
    log: MetricsLog
    step: int = 0
    """Optimiser steps done in this stage."""
    global_step: int = 0
    """Optimiser steps done in the whole run."""
    optimizer: torch.optim.Optimizer | None = None
    """None during `on_stage_start` (built afterwards, so that new parameters are included)."""
    micro_batches: int = 1
    """Micro-batches of the current optimiser step on this rank."""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


class TrainerHook:
    """Base class: every method is a no-op (see the module docstring for when each runs)."""

    def on_stage_start(self, state: TrainState) -> None:
        pass

    def extra_loss(self, state: TrainState) -> torch.Tensor | None:
        return None

    def before_optimizer(self, state: TrainState) -> None:
        pass

    def after_step(self, state: TrainState) -> None:
        pass

    def on_step_end(self, state: TrainState) -> None:
        pass

    def on_stage_end(self, state: TrainState) -> None:
        pass
