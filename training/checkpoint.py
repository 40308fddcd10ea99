"""Resumable checkpoints: adapter weights, optimiser/scheduler, RNG states, data position, DOG state.

A checkpoint is a directory `RunDir.checkpoint(global step)` holding `RunDir.STATE`, written atomically
(`badit_serve.atomic`); `RunDir.latest_pointer` names the newest complete one. The state file is a plain
dict (adapter, optimizer, scheduler, rng, dog, progress = `RunProgress.to_dict()`).
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from badit_serve.atomic import atomic_directory, atomic_write_text
from training.adapters import adapted_layers, adapter_state_dict, load_adapter_state_dict
from training.progress import RunProgress
from training.run_dir import RunDir


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def dog_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The DOG accumulators (signal since the last regroup) of every adapted layer."""
    state = {}
    for name, layer in adapted_layers(model).items():
        state[f"{name}.dog_grad_a"] = layer.dog_grad_a.clone()
        state[f"{name}.dog_grad_b"] = layer.dog_grad_b.clone()
        state[f"{name}.dog_steps"] = layer.dog_steps.clone()
    return state


def load_dog_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    for name, layer in adapted_layers(model).items():
        layer.dog_grad_a.copy_(state[f"{name}.dog_grad_a"])
        layer.dog_grad_b.copy_(state[f"{name}.dog_grad_b"])
        layer.dog_steps.copy_(state[f"{name}.dog_steps"])


def save_checkpoint(
    run: RunDir,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    progress: RunProgress,
    keep: int = 2,
) -> Path:
    """Atomically write a checkpoint at `progress.global_step`, point `latest` at it, keep the newest `keep`."""
    target = run.checkpoint(progress.global_step)
    with atomic_directory(target, force=True) as staging:  # a re-run step replaces its checkpoint
        torch.save(
            {
                "adapter": adapter_state_dict(model),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng_state(),
                "dog": dog_state(model),
                "progress": progress.to_dict(),
            },
            RunDir.state_file(staging),
        )
    atomic_write_text(run.latest_pointer, target.name)
    for old in sorted(run.checkpoints.glob("step-*"))[:-keep]:
        if old != target:
            shutil.rmtree(old, ignore_errors=True)
    return target


def latest_checkpoint(run: RunDir | Path) -> Path | None:
    """The newest complete checkpoint directory of a run, or None."""
    run = RunDir.at(run)
    if not run.latest_pointer.is_file():
        return None
    path = run.checkpoints / run.latest_pointer.read_text().strip()
    return path if RunDir.state_file(path).is_file() else None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The state dict of a checkpoint directory (or of its state file)."""
    file = RunDir.state_file(path) if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no checkpoint state")
    return torch.load(file, map_location="cpu", weights_only=False)


def checkpoint_progress(state: dict[str, Any]) -> RunProgress:
    """The typed progress saved in a checkpoint's state."""
    return RunProgress.from_dict(state["progress"])


def restore_training_state(
    state: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> None:
    load_adapter_state_dict(model, state["adapter"])
    load_dog_state(model, state["dog"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
