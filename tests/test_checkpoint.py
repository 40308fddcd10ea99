"""Checkpoints without pickle: safetensors + JSON round trip, RNG continuation, old pickle files refused."""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from training.adapters import AdapterConfig, apply_adapters
from training.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    restore_training_state,
    save_checkpoint,
)
from training.progress import RunProgress, StageRow, TaskResult
from training.run_dir import RunDir


def _trained(model_dir: Path, steps: int = 2):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    apply_adapters(model, AdapterConfig(rank=2), seed=0)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    tokens = torch.randint(3, 500, (2, 10), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        model(tokens, labels=tokens).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model, optimizer, scheduler


def _draws() -> tuple:
    return torch.rand(3).tolist(), random.random(), np.random.rand(2).tolist()


def test_a_checkpoint_round_trips_exactly_and_continues_every_rng(tiny_model_dirs, tmp_path) -> None:
    model, optimizer, scheduler = _trained(tiny_model_dirs["llama"])
    progress = RunProgress(
        stage=1, stage_step=2, global_step=5, rows=(StageRow(0, "mixed", 3, {"t": TaskResult(1.5, 0.0, 2)}),)
    )
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    path = save_checkpoint(
        RunDir(tmp_path), model=model, optimizer=optimizer, scheduler=scheduler, progress=progress
    )
    expected_draws = _draws()
    assert sorted(p.name for p in path.iterdir()) == ["state.json", "tensors.safetensors"]
    assert latest_checkpoint(tmp_path) == path

    state = load_checkpoint(path)
    assert state.progress == progress
    fresh, fresh_opt, fresh_sched = _trained(tiny_model_dirs["llama"], steps=0)
    restore_training_state(state, fresh, fresh_opt, fresh_sched)
    assert _draws() == expected_draws  # torch, Python and NumPy continue where the checkpoint was taken
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    saved, restored = optimizer.state_dict(), fresh_opt.state_dict()
    assert restored["param_groups"] == json.loads(json.dumps(saved["param_groups"]))
    for pid, entries in saved["state"].items():
        for key, value in entries.items():
            torch.testing.assert_close(restored["state"][pid][key], value, rtol=0, atol=0)
    assert fresh_sched.state_dict() == scheduler.state_dict()


def test_an_old_pickle_checkpoint_is_refused_without_running_its_code(tmp_path) -> None:
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    checkpoint = tmp_path / "checkpoints" / "step-0000001"
    checkpoint.mkdir(parents=True)
    (checkpoint / "state.pt").write_bytes(pickle.dumps({"adapter": Payload()}))
    with pytest.raises(CheckpointError, match=r"state\.pt: a pickle checkpoint .* not loaded"):
        load_checkpoint(checkpoint)
    assert not marker.exists()


def test_damaged_checkpoints_get_an_error_naming_the_file(tiny_model_dirs, tmp_path) -> None:
    model, optimizer, scheduler = _trained(tiny_model_dirs["llama"], steps=1)
    path = save_checkpoint(
        RunDir(tmp_path), model=model, optimizer=optimizer, scheduler=scheduler, progress=RunProgress()
    )
    tensors = RunDir.tensors_file(path)
    tensors.write_bytes(tensors.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path)
    RunDir.state_file(path).write_text('{"format": "something-else"}')
    with pytest.raises(CheckpointError, match="state.json: not a badit-checkpoint"):
        load_checkpoint(path)


def test_a_failed_tensor_write_is_an_oserror_naming_the_file(tmp_path) -> None:
    from badit_serve.core.tensor_files import write_tensors

    with pytest.raises(OSError, match="missing-dir") as caught:
        write_tensors(tmp_path / "missing-dir" / "x.safetensors", {"a": torch.zeros(2)})
    assert caught.value.filename.endswith("x.safetensors")
