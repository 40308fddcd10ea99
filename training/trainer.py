"""One training stage as a small recipe: `setup` (optimiser, schedule, resume), `train` (the step loop),
`save_checkpoint`, `cleanup`; each takes only its part of the config. Extension points are hooks
(`training.hooks`): DOG is one, tests install an interrupt as another.

A step: the global batch's example indices (a seeded per-epoch permutation, split over data-parallel
ranks), micro-batches with gradient accumulation, loss = response-token sum / global response tokens,
clip, `before_optimizer` hooks, AdamW + schedule, the metrics line, `after_step` hooks, the checkpoint,
`on_step_end` hooks.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from training.adapters import collect_aux_loss, router_load, trainable_parameters
from training.checkpoint import TrainingState, restore_training_state, save_checkpoint
from training.config import OutputConfig, TrainConfig
from training.data import TrainExample, collate_train
from training.distributed import World, barrier, sum_across
from training.hooks import TrainerHook, TrainState
from training.loss import IGNORE_INDEX, ResponseLoss
from training.metrics_log import MetricsLog
from training.progress import RunProgress
from training.run_dir import RunDir
from training.schedule import make_scheduler, steps_per_epoch, total_steps


def example_order(num_examples: int, positions: range, seed: int, stage: int) -> list[int]:
    """Example indices at the given positions of the stage's stream of seeded per-epoch permutations."""
    order: list[int] = []
    cached_epoch = -1
    perm: list[int] = []  # drawn at the first position (its epoch >= 0 differs from -1)
    for position in positions:
        epoch = position // num_examples
        if epoch != cached_epoch:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + stage * 10_007 + epoch)
            perm, cached_epoch = torch.randperm(num_examples, generator=gen).tolist(), epoch
        order.append(perm[position % num_examples])
    return order


@dataclass(frozen=True)
class Stage:
    """Which stage to train and from where."""

    index: int
    name: str
    progress: RunProgress
    """The run's progress at this stage's start (or at the checkpoint it resumes from)."""
    resume_state: TrainingState | None = None
    """A mid-stage checkpoint's state to continue from (its progress.stage_step steps are done)."""


@dataclass(frozen=True)
class StageResult:
    global_step: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


@dataclass(frozen=True)
class StepLoss:
    """Mean response loss and load-balancing loss of one optimiser step (this rank's share)."""

    loss: float
    aux: float


class StageTrainer:
    """Trains one stage of `model` on `examples` (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        examples: list[TrainExample],
        *,
        run: RunDir,
        world: World,
        pad_id: int,
        hooks: list[TrainerHook],
        aux_loss_coef: float = 0.0,
        show_progress: bool = True,
    ) -> None:
        self.model, self.examples, self.run, self.world = model, examples, run, world
        self.pad_id, self.hooks = pad_id, hooks
        self.aux_loss_coef, self.show_progress = aux_loss_coef, show_progress
        self.log = MetricsLog(run.metrics)

    def _call(self, event: str) -> None:
        for hook in self.hooks:
            getattr(hook, event)(self.state)

    def setup(self, train: TrainConfig, stage: Stage) -> None:
        """Hooks' stage start, then optimiser and schedule (restored when resuming), the loss module."""
        self.cfg, self.stage = train, stage
        n = len(self.examples)
        self.state = TrainState(
            model=self.model,
            examples=self.examples,
            pad_id=self.pad_id,
            stage=stage.index,
            stage_name=stage.name,
            total=total_steps(n, train),
            per_epoch=steps_per_epoch(n, train),
            world=self.world,
            log=self.log,
        )
        self._call("on_stage_start")  # before the optimiser: hooks may add or freeze parameters
        params = trainable_parameters(self.model)
        self.optimizer = torch.optim.AdamW(
            params, lr=train.lr, betas=train.betas, weight_decay=train.weight_decay
        )
        self.scheduler = make_scheduler(self.optimizer, train, self.state.total)
        self.start = 0
        if stage.resume_state is not None:
            restore_training_state(stage.resume_state, self.model, self.optimizer, self.scheduler)
            self.start = stage.progress.stage_step
        self.state.optimizer, self.state.step = self.optimizer, self.start
        self.state.global_step = stage.progress.global_step
        self.loss_module: nn.Module = ResponseLoss(self.model)
        if self.world.enabled:  # gradients are all-reduced before the DOG signal is accumulated
            self.loss_module = nn.parallel.DistributedDataParallel(self.loss_module, broadcast_buffers=False)
        if train.gradient_checkpointing:
            assert isinstance(self.model, PreTrainedModel)  # checkpointing is transformers' switch
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def train(self, output: OutputConfig) -> StageResult:
        """The step loop from `setup`'s start to the stage's last step."""
        self.model.train()
        total, show = self.state.total, self.show_progress and self.world.is_main
        bar = tqdm(
            range(self.start, total),
            desc=f"train {self.stage.name}",
            disable=not show,
            initial=self.start,
            total=total,
        )
        for step in bar:
            step_loss = self._forward_backward(step)
            self._optimizer_step()
            self.state.step, self.state.global_step = step + 1, self.state.global_step + 1
            bar.set_postfix(loss=f"{step_loss.loss:.3f}")
            self._log_step(step_loss, output.log_every)
            self._call("after_step")
            every = output.checkpoint_every
            if every and (step + 1) % every == 0 and step + 1 < total:
                self.save_checkpoint()
            self._call("on_step_end")
        self._call("on_stage_end")
        return StageResult(self.state.global_step, self.optimizer, self.scheduler)

    def _batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of optimiser step `step`."""
        per_step, size = self.cfg.batch_size * self.cfg.grad_accum, self.world.size
        positions = range(step * per_step, (step + 1) * per_step)
        indices = example_order(len(self.examples), positions, self.cfg.seed, self.stage.index)
        indices = indices[self.world.rank :: size]  # this rank's share of the global batch
        micro = max(1, self.cfg.batch_size // size)
        return [
            collate_train([self.examples[i] for i in indices[k : k + micro]], self.pad_id)
            for k in range(0, len(indices), micro)
        ]

    def _autocast(self) -> torch.autocast:
        device = self.state.device
        enabled = self.cfg.autocast_bf16 if self.cfg.autocast_bf16 is not None else device.type == "cuda"
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bool(enabled))

    def _forward_backward(self, step: int) -> StepLoss:
        """Accumulate the step's gradients: loss = response-token sum / the global batch's response tokens."""
        device, world = self.state.device, self.world
        batches = self._batches(step)
        self.state.micro_batches = len(batches)
        local_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
        tokens = max(int(sum_across(world, local_tokens, device)), 1)  # response tokens of the global batch
        loss_total, aux_total = 0.0, 0.0
        for k, batch in enumerate(batches):
            batch = {key: v.to(device) for key, v in batch.items()}
            sync = k == len(batches) - 1 or not world.enabled
            no_sync: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
            if not sync:  # only with world.enabled, i.e. under DistributedDataParallel
                assert isinstance(self.loss_module, nn.parallel.DistributedDataParallel)
                no_sync = self.loss_module.no_sync()
            with self._autocast(), no_sync:
                loss_sum, _ = self.loss_module(batch)
                # DDP averages gradients over ranks; scaling by world size makes it the global token mean.
                loss = loss_sum / tokens * world.size
                aux = collect_aux_loss(self.model)
                if aux is not None and self.aux_loss_coef > 0:
                    loss = loss + self.aux_loss_coef * aux / len(batches)
                loss = self._add_extra_losses(loss, len(batches))
                loss.backward()  # type: ignore[no-untyped-call]  # torch's Tensor.backward is unannotated
            loss_total += loss_sum.item() / tokens
            aux_total += aux.item() / len(batches) if aux is not None else 0.0
        return StepLoss(loss_total, aux_total)

    def _add_extra_losses(self, loss: torch.Tensor, micro_batches: int) -> torch.Tensor:
        """Hooks' per-step loss terms, a 1/micro_batches share on each micro-batch."""
        for hook in self.hooks:
            term = hook.extra_loss(self.state)
            if term is not None:
                loss = loss + term / micro_batches
        return loss

    def _optimizer_step(self) -> None:
        if self.cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(trainable_parameters(self.model), self.cfg.max_grad_norm)
        self._call("before_optimizer")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _log_step(self, step_loss: StepLoss, log_every: int) -> None:
        """The step's metrics line (rank 0, every `log_every` steps and at the stage's end)."""
        loss = sum_across(self.world, step_loss.loss, self.state.device)  # every rank takes part
        step, total = self.state.step, self.state.total
        if not self.world.is_main or (step % log_every != 0 and step != total):
            return
        load = router_load(self.model)
        mean_load = [sum(col) / len(col) for col in zip(*load.values(), strict=True)] if load else None
        record = {
            "event": "step",
            "stage": self.stage.index,
            "stage_name": self.stage.name,
            "step": self.state.global_step,
            "loss": loss,
            "lr": self.scheduler.get_last_lr()[0],
            "aux_loss": step_loss.aux,
            "router_load": mean_load,
        }
        self.log.write(record)

    def save_checkpoint(self) -> None:
        """A mid-stage checkpoint (rank 0 writes, every rank waits)."""
        progress = self.stage.progress.at_step(self.stage.index, self.state.step, self.state.global_step)
        if self.world.is_main:
            save_checkpoint(
                self.run,
                model=self.model,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                progress=progress,
            )
        barrier(self.world)

    def cleanup(self) -> None:
        if self.cfg.gradient_checkpointing:
            assert isinstance(self.model, PreTrainedModel)  # checkpointing is transformers' switch
            self.model.gradient_checkpointing_disable()


def train_stage(trainer: StageTrainer, stage: Stage, train: TrainConfig, output: OutputConfig) -> StageResult:
    """setup, train, cleanup (cleanup also when training raises)."""
    trainer.setup(train, stage)
    try:
        return trainer.train(output)
    finally:
        trainer.cleanup()
