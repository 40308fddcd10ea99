"""The hooks a run installs from its adapter config: one factory per hook in `HOOK_FACTORIES` (adding a
hook = one entry); `run(hooks=...)` adds more (tests)."""

from __future__ import annotations

from collections.abc import Callable

from training.adapters import AdapterConfig
from training.hooks.base import TrainerHook
from training.hooks.branches import BranchHook
from training.hooks.dog import DogHook


def _dog_hook(adapter: AdapterConfig) -> TrainerHook | None:
    return DogHook(adapter.dog) if adapter.resolved().dog else None


def _branch_hook(adapter: AdapterConfig) -> TrainerHook | None:
    if adapter.resolved().branching is None:
        return None
    return BranchHook(adapter.branches)


HOOK_FACTORIES: list[Callable[[AdapterConfig], TrainerHook | None]] = [_dog_hook, _branch_hook]
"""Hooks a run installs from its adapter config, in call order."""


def config_hooks(adapter: AdapterConfig) -> list[TrainerHook]:
    """The hooks that `HOOK_FACTORIES` build for this adapter config."""
    return [hook for factory in HOOK_FACTORIES if (hook := factory(adapter)) is not None]
