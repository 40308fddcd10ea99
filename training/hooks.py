"""Trainer hooks: the extension points of a training stage, and the built-in DOG hook.

A hook subclasses `TrainerHook` and overrides what it needs; the trainer calls every hook in order at

    on_stage_start       each stage's start (every sequential task boundary), before the optimiser is
                         built: add or freeze parameters here (O-LoRA / GainLoRA branches), reset signals
    extra_loss           each micro-batch: a per-step loss term (e.g. O-LoRA's orthogonality loss), added
                         as term / micro-batches so its gradient per optimiser step is that of the term
    before_optimizer     gradients are final (accumulated, all-reduced, clipped), weights not yet updated
    after_step           after the update and the step's metrics line, before the step's checkpoint
    on_step_end          after the step's checkpoint (tests install an interrupt here)
    on_stage_end         after the stage's last step

Hooks built from the config are listed in `HOOK_FACTORIES` (adding one = one entry); `run(hooks=...)` adds
more (tests). Hooks must behave identically on every data-parallel rank, except for logging.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from training.adapters import (
    AdapterConfig,
    DogConfig,
    accumulate_dog_signal,
    adapted_layers,
    regroup,
    reset_dog_signal,
)
from training.data import TrainExample, collate_train
from training.distributed import World
from training.metrics_log import MetricsLog
from training.schedule import regroup_due


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


class DogHook(TrainerHook):
    """Dynamically orthogonal grouping: accumulate the gradient signal every step, regroup when due."""

    def __init__(self, dog: DogConfig) -> None:
        self.dog = dog
        self.probe: dict[str, torch.Tensor] = {}

    def on_stage_start(self, state: TrainState) -> None:
        """The signal restarts at each stage (a sequential task boundary), so a regroup never mixes the
        gradients of two tasks; a fixed probe batch (the stage's first examples) for the drift check."""
        reset_dog_signal(state.model)
        probe = collate_train(state.examples[: min(4, len(state.examples))], state.pad_id)
        self.probe = {k: v.to(state.device) for k, v in probe.items()}

    def before_optimizer(self, state: TrainState) -> None:
        accumulate_dog_signal(state.model)

    def after_step(self, state: TrainState) -> None:
        due = regroup_due(state.step, state.total, state.per_epoch, self.dog)
        if not due or not adapted_layers(state.model) or state.optimizer is None:
            return
        report = regroup(state.model, state.optimizer, self.probe, self.dog)
        if state.world.is_main:
            state.log.write(
                {
                    "event": "regroup",
                    "stage": state.stage,
                    "step": state.global_step,
                    **report.summary(),
                    "layers": report.to_dict()["layers"],
                }
            )


def _dog_hook(adapter: AdapterConfig) -> TrainerHook | None:
    return DogHook(adapter.dog) if adapter.resolved().dog else None


def _branch_hook(adapter: AdapterConfig) -> TrainerHook | None:
    if adapter.resolved().branching is None:
        return None
    from training.branch_hooks import BranchHook  # it subclasses TrainerHook: imported late, no cycle

    return BranchHook(adapter.branches)


HOOK_FACTORIES: list[Callable[[AdapterConfig], TrainerHook | None]] = [_dog_hook, _branch_hook]
"""Hooks a run installs from its adapter config, in call order."""


def config_hooks(adapter: AdapterConfig) -> list[TrainerHook]:
    """The hooks that `HOOK_FACTORIES` build for this adapter config."""
    return [hook for factory in HOOK_FACTORIES if (hook := factory(adapter)) is not None]
