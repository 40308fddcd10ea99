"""The DOG hook: accumulate the gradient signal every step, regroup the experts' components when due."""

from __future__ import annotations

import torch

from training.adapters import DogConfig, accumulate_dog_signal, adapted_layers, regroup, reset_dog_signal
from training.data import collate_train
from training.hooks.base import TrainerHook, TrainState
from training.schedule import regroup_due


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
