"""StageTrainer and its hooks on a tiny model, in process (no CLI, no data files): call order and the
extra-loss extension point."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from training.adapters import AdapterConfig, adapter_state_dict, apply_adapters
from training.config import OutputConfig, TrainConfig
from training.data import IGNORE_INDEX, TrainExample
from training.distributed import World
from training.hooks import TrainerHook, TrainState
from training.progress import RunProgress
from training.run_dir import RunDir
from training.trainer import Stage, StageTrainer, train_stage


def _examples(n: int = 4) -> list[TrainExample]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        ids = torch.randint(3, 1000, (10,), generator=gen).tolist()
        labels = [IGNORE_INDEX] * 6 + ids[6:]
        out.append(TrainExample("t", str(i), ids, labels, 0, 0))
    return out


def _train(model_dir: Path, run_dir: Path, hooks: list[TrainerHook], checkpoint_every: int | None = None):
    model = apply_adapters(
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        AdapterConfig(method="badit", rank=2, dropout=0.0),
        seed=0,
    )
    trainer = StageTrainer(
        model, _examples(), run=RunDir(run_dir), world=World(), pad_id=2, hooks=hooks, show_progress=False
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    train = TrainConfig(max_steps=2, batch_size=2, grad_accum=2, lr=0.01)
    output = OutputConfig(dir=run_dir, checkpoint_every=checkpoint_every, log_every=1)
    train_stage(trainer, Stage(0, "s", RunProgress()), train, output)
    return adapter_state_dict(model)


class Recorder(TrainerHook):
    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []

    def on_stage_start(self, state: TrainState) -> None:
        assert state.optimizer is None  # built afterwards, so parameters added here would train
        self.events.append(("on_stage_start", state.step))

    def extra_loss(self, state: TrainState) -> torch.Tensor | None:
        self.events.append(("extra_loss", state.step))
        return None

    def before_optimizer(self, state: TrainState) -> None:
        self.events.append(("before_optimizer", state.step))

    def after_step(self, state: TrainState) -> None:
        self.events.append(("after_step", state.step))

    def on_step_end(self, state: TrainState) -> None:
        checkpoint = RunDir(state.log.path.parent).checkpoint(state.global_step)
        assert checkpoint.is_dir() == (state.step < state.total)  # mid-stage checkpoints come first
        self.events.append(("on_step_end", state.step))

    def on_stage_end(self, state: TrainState) -> None:
        self.events.append(("on_stage_end", state.step))


def test_hooks_are_called_in_step_order(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    recorder = Recorder()
    _train(tiny_model_dirs["llama"], tmp_path / "run", [recorder], checkpoint_every=1)
    per_step = [
        ("extra_loss", 0),
        ("extra_loss", 0),
        ("before_optimizer", 0),
        ("after_step", 1),
        ("on_step_end", 1),
    ]
    second = [(name, step + 1) for name, step in per_step]
    assert recorder.events == [("on_stage_start", 0), *per_step, *second, ("on_stage_end", 2)]


class ExtraLoss(TrainerHook):
    def __init__(self, weight: float) -> None:
        self.weight = weight

    def extra_loss(self, state: TrainState) -> torch.Tensor | None:
        b = [p for n, p in state.model.named_parameters() if n.endswith("lora_b")]
        return self.weight * torch.stack([(p * p).sum() for p in b]).sum()


def test_extra_loss_term_reaches_the_update(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    plain = _train(tiny_model_dirs["llama"], tmp_path / "plain", [])
    zero = _train(tiny_model_dirs["llama"], tmp_path / "zero", [ExtraLoss(0.0)])
    pulled = _train(tiny_model_dirs["llama"], tmp_path / "pulled", [ExtraLoss(10.0)])
    for key in plain:
        torch.testing.assert_close(zero[key], plain[key], atol=0, rtol=0, msg=key)
    moved = [k for k in plain if k.endswith("lora_b") and not torch.equal(pulled[k], plain[k])]
    assert moved and all(
        not k.endswith("lora_b") or pulled[k].norm() <= plain[k].norm() + 1e-6 for k in moved
    )
