"""Resumable checkpoints without pickle: adapter weights, optimiser/scheduler, RNG states, data position, DOG.

A checkpoint is a directory `RunDir.checkpoint(global step)`, written atomically (`badit_serve.core.atomic`):

    tensors.safetensors   adapter.<name>, dog.<name>, optimizer.<param id>.<key>, rng.torch, rng.cuda.<i>
    state.json            format + version, progress (`RunProgress`), optimiser param groups and its
                          non-tensor state ({"tensor": name} where a tensor stands), scheduler state,
                          Python and NumPy RNG states

`RunDir.latest_pointer` names the newest complete one. Loading reads only safetensors and JSON, so a
checkpoint written by someone else cannot run code. A pickle `state.pt` of an older badit is refused with a
message naming the file (`torch.load(weights_only=True)` cannot read its NumPy RNG state either).
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from badit_serve.core.atomic import atomic_directory, atomic_write_text
from badit_serve.core.tensor_files import write_tensors
from training.adapters import adapted_layers, adapter_state_dict, load_adapter_state_dict
from training.progress import RunProgress
from training.run_dir import RunDir

FORMAT = "badit-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file."""


@dataclass
class RngState:
    """Every random generator a resumed run must continue: torch (CPU and each CUDA device), Python, NumPy."""

    torch_cpu: torch.Tensor
    cuda: list[torch.Tensor]
    python: tuple[Any, ...]
    numpy: tuple[Any, ...]

    @classmethod
    def capture(cls) -> RngState:
        cuda = list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else []
        numpy_state = np.random.get_state(legacy=True)  # the default
        assert isinstance(numpy_state, tuple)  # the global RandomState is MT19937: its legacy tuple
        return cls(torch.get_rng_state(), cuda, random.getstate(), numpy_state)

    def restore(self) -> None:
        torch.set_rng_state(self.torch_cpu)
        if self.cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(self.cuda)
        random.setstate(self.python)
        np.random.set_state(self.numpy)


@dataclass
class TrainingState:
    """Everything a checkpoint holds, typed."""

    adapter: dict[str, torch.Tensor]
    dog: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    """torch's `Optimizer.state_dict()`."""
    scheduler: dict[str, Any]
    """torch's `LRScheduler.state_dict()`."""
    rng: RngState
    progress: RunProgress = field(default_factory=RunProgress)


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


# ---- encoding: tensors into one flat safetensors dict, the rest into JSON -------------------------------


def _optimizer_json(optimizer: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for pid, entries in optimizer["state"].items():
        state[str(pid)] = {}
        for key, value in entries.items():
            if torch.is_tensor(value):
                name = f"optimizer.{pid}.{key}"
                tensors[name] = value.detach().cpu().contiguous()
                value = {"tensor": name}
            state[str(pid)][key] = value
    return {"state": state, "param_groups": optimizer["param_groups"]}


def _optimizer_from_json(raw: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    def value(v: Any) -> Any:
        return tensors[v["tensor"]] if isinstance(v, dict) and set(v) == {"tensor"} else v

    state = {int(pid): {k: value(v) for k, v in entries.items()} for pid, entries in raw["state"].items()}
    return {"state": state, "param_groups": raw["param_groups"]}


def _rng_json(rng: RngState, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    tensors["rng.torch"] = rng.torch_cpu
    for i, state in enumerate(rng.cuda):
        tensors[f"rng.cuda.{i}"] = state.cpu()
    version, internal, gauss = rng.python
    kind, keys, pos, has_gauss, cached = rng.numpy
    return {
        "cuda_devices": len(rng.cuda),
        "python": {"version": version, "state": list(internal), "gauss_next": gauss},
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": pos, "has_gauss": has_gauss, "cached": cached},
    }


def _rng_from_json(raw: dict[str, Any], tensors: dict[str, torch.Tensor]) -> RngState:
    py, nprng = raw["python"], raw["numpy"]
    keys = np.asarray(nprng["keys"], dtype=np.uint32)
    return RngState(
        torch_cpu=tensors["rng.torch"],
        cuda=[tensors[f"rng.cuda.{i}"] for i in range(raw["cuda_devices"])],
        python=(py["version"], tuple(py["state"]), py["gauss_next"]),
        numpy=(nprng["kind"], keys, nprng["pos"], nprng["has_gauss"], nprng["cached"]),
    )


def encode(state: TrainingState) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors for safetensors, JSON document) of a training state."""
    tensors = {f"adapter.{k}": v.detach().cpu().contiguous() for k, v in state.adapter.items()}
    tensors.update({f"dog.{k}": v.detach().cpu().contiguous() for k, v in state.dog.items()})
    document = {
        "format": FORMAT,
        "version": VERSION,
        "progress": state.progress.to_dict(),
        "optimizer": _optimizer_json(state.optimizer, tensors),
        "scheduler": state.scheduler,
        "rng": _rng_json(state.rng, tensors),
    }
    return tensors, document


def decode(tensors: dict[str, torch.Tensor], document: dict[str, Any]) -> TrainingState:
    def prefixed(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    return TrainingState(
        adapter=prefixed("adapter."),
        dog=prefixed("dog."),
        optimizer=_optimizer_from_json(document["optimizer"], tensors),
        scheduler=document["scheduler"],
        rng=_rng_from_json(document["rng"], tensors),
        progress=RunProgress.from_dict(document["progress"]),
    )


# ---- files ------------------------------------------------------------------------------------------------


def write_state(directory: Path, state: TrainingState) -> None:
    """The two checkpoint files of `state` inside `directory` (JSON first: a bad value fails before the big write)."""
    tensors, document = encode(state)
    try:
        text = json.dumps(document, allow_nan=True)
    except TypeError as exc:
        raise CheckpointError(f"{RunDir.state_file(directory)}: state is not plain data: {exc}") from exc
    RunDir.state_file(directory).write_text(text)
    write_tensors(RunDir.tensors_file(directory), tensors)


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
    state = TrainingState(
        adapter=adapter_state_dict(model),
        dog=dog_state(model),
        optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(),
        rng=RngState.capture(),
        progress=progress,
    )
    target = run.checkpoint(progress.global_step)
    with atomic_directory(target, force=True) as staging:  # a re-run step replaces its checkpoint
        write_state(staging, state)
    atomic_write_text(run.latest_pointer, target.name)
    for old in sorted(run.checkpoints.glob("step-*"))[:-keep]:
        if old != target:
            shutil.rmtree(old, ignore_errors=True)
    return target


def is_checkpoint(directory: Path) -> bool:
    """Whether `directory` holds a checkpoint, current or of the refused pickle kind."""
    return RunDir.state_file(directory).is_file() or RunDir.legacy_state_file(directory).is_file()


def latest_checkpoint(run: RunDir | Path) -> Path | None:
    """The newest complete checkpoint directory of a run, or None."""
    run = RunDir.at(run)
    if not run.latest_pointer.is_file():
        return None
    path = run.checkpoints / run.latest_pointer.read_text().strip()
    return path if is_checkpoint(path) else None


def load_checkpoint(path: Path) -> TrainingState:
    """The state of a checkpoint directory; `CheckpointError` naming the file when it cannot be trusted."""
    state_file, tensors_file = RunDir.state_file(path), RunDir.tensors_file(path)
    legacy = RunDir.legacy_state_file(path)
    if not state_file.is_file() and legacy.is_file():
        raise CheckpointError(
            f"{legacy}: a pickle checkpoint of an older badit; it is not loaded, because unpickling a file can "
            "run code from it. Resume from a checkpoint written by this version, or start the run again."
        )
    if not state_file.is_file():
        raise FileNotFoundError(f"{state_file}: no checkpoint state")
    try:
        document = json.loads(state_file.read_text())
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"{state_file}: unreadable checkpoint state: {exc}") from exc
    if not isinstance(document, dict) or (document.get("format"), document.get("version")) != (
        FORMAT,
        VERSION,
    ):
        raise CheckpointError(f"{state_file}: not a {FORMAT} version {VERSION} state file")
    try:
        tensors = load_file(tensors_file)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{tensors_file}: unreadable checkpoint tensors: {exc}") from exc
    try:
        return decode(tensors, document)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: incomplete checkpoint, missing or bad entry {exc}") from exc


def restore_training_state(
    state: TrainingState,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> None:
    load_adapter_state_dict(model, state.adapter)
    load_dog_state(model, state.dog)
    if optimizer is not None:
        optimizer.load_state_dict(state.optimizer)
    if scheduler is not None:
        scheduler.load_state_dict(state.scheduler)
    state.rng.restore()
