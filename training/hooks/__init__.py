"""Trainer hooks: the extension points of a training stage (`base`), the built-in DOG (`dog`) and
per-task-branch (`branches`) hooks, and the table that installs them from a config (`registry`)."""

from training.hooks.base import TrainerHook, TrainState
from training.hooks.registry import HOOK_FACTORIES, config_hooks

__all__ = ["HOOK_FACTORIES", "TrainState", "TrainerHook", "config_hooks"]
