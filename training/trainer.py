"""One training stage: AdamW + schedule, gradient accumulation, DOG signal and regroups, checkpoints."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from training.adapters import (
    accumulate_dog_signal,
    adapted_layers,
    collect_aux_loss,
    regroup,
    router_load,
    trainable_parameters,
)
from training.checkpoint import restore_training_state, save_checkpoint
from training.config import RunConfig
from training.data import TrainExample, collate_train
from training.distributed import World, barrier, sum_across
from training.loss import IGNORE_INDEX, ResponseLoss
from training.schedule import make_scheduler, regroup_due, steps_per_epoch, total_steps


class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl (flushed at once, so a killed run keeps it)."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


def example_order(num_examples: int, positions: range, seed: int, stage: int) -> list[int]:
    """Example indices at the given positions of the stage's stream of seeded per-epoch permutations."""
    order: list[int] = []
    cached_epoch, perm = -1, None
    for position in positions:
        epoch = position // num_examples
        if epoch != cached_epoch:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + stage * 10_007 + epoch)
            perm, cached_epoch = torch.randperm(num_examples, generator=gen).tolist(), epoch
        order.append(perm[position % num_examples])
    return order


@dataclass
class StageContext:
    """What a stage needs besides the model and its examples."""

    cfg: RunConfig
    run_dir: Path
    log: MetricsLog
    stage: int
    stage_name: str
    pad_id: int
    global_step: int
    """Optimiser steps done before this stage (all stages)."""
    progress_extra: dict[str, Any] = field(default_factory=dict)
    """Saved with every checkpoint (scores so far, task order, ...)."""
    resume_state: dict[str, Any] | None = None
    show_progress: bool = True
    interrupt_at: int | None = None
    """Test hook: raise KeyboardInterrupt right after this global step (after its checkpoint)."""
    world: World = field(default_factory=World)
    """Data-parallel world: each rank takes every size-th example of a step; rank 0 logs and saves."""


def _micro_batches(
    examples: list[TrainExample], indices: list[int], batch_size: int, pad_id: int
) -> list[dict]:
    return [
        collate_train([examples[i] for i in indices[k : k + batch_size]], pad_id)
        for k in range(0, len(indices), batch_size)
    ]


def _autocast(cfg: RunConfig, device: torch.device):
    enabled = cfg.train.autocast_bf16 if cfg.train.autocast_bf16 is not None else device.type == "cuda"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bool(enabled))


@dataclass
class StageResult:
    global_step: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


def train_stage(model: nn.Module, examples: list[TrainExample], ctx: StageContext) -> StageResult:
    """Train one stage from its start (or from `ctx.resume_state`)."""
    cfg, tcfg = ctx.cfg, ctx.cfg.train
    device = next(model.parameters()).device
    per_step = tcfg.batch_size * tcfg.grad_accum
    per_epoch, total = steps_per_epoch(len(examples), tcfg), total_steps(len(examples), tcfg)
    optimizer = torch.optim.AdamW(
        trainable_parameters(model), lr=tcfg.lr, betas=tcfg.betas, weight_decay=tcfg.weight_decay
    )
    scheduler = make_scheduler(optimizer, tcfg, total)
    start = 0
    if ctx.resume_state is not None:
        restore_training_state(ctx.resume_state, model, optimizer, scheduler)
        start = ctx.resume_state["progress"]["stage_step"]
    loss_module: nn.Module = ResponseLoss(model)
    world = ctx.world
    if world.enabled:  # gradients are all-reduced before the DOG signal is accumulated
        loss_module = nn.parallel.DistributedDataParallel(loss_module, broadcast_buffers=False)
    if tcfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    probe = collate_train(examples[: min(4, len(examples))], ctx.pad_id)
    probe = {k: v.to(device) for k, v in probe.items()}
    use_dog = cfg.adapter.resolved_values()["dog"]
    model.train()
    show = ctx.show_progress and world.is_main
    bar = tqdm(
        range(start, total), desc=f"train {ctx.stage_name}", disable=not show, initial=start, total=total
    )
    global_step = ctx.global_step + start
    for step in bar:
        indices = example_order(
            len(examples), range(step * per_step, (step + 1) * per_step), tcfg.seed, ctx.stage
        )
        indices = indices[world.rank :: world.size]  # this rank's share of the global batch
        batches = _micro_batches(examples, indices, max(1, tcfg.batch_size // world.size), ctx.pad_id)
        local_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
        tokens = max(int(sum_across(world, local_tokens, device)), 1)  # response tokens of the global batch
        loss_total, aux_total = 0.0, 0.0
        for k, batch in enumerate(batches):
            batch = {key: v.to(device) for key, v in batch.items()}
            sync = k == len(batches) - 1 or not world.enabled
            with _autocast(cfg, device), loss_module.no_sync() if not sync else contextlib.nullcontext():
                loss_sum, _ = loss_module(batch)
                # DDP averages gradients over ranks; scaling by world size makes it the global token mean.
                loss = loss_sum / tokens * world.size
                aux = collect_aux_loss(model)
                if aux is not None and cfg.adapter.aux_loss_coef > 0:
                    loss = loss + cfg.adapter.aux_loss_coef * aux / len(batches)
                loss.backward()
            loss_total += loss_sum.item() / tokens
            aux_total += aux.item() / len(batches) if aux is not None else 0.0
        if tcfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(trainable_parameters(model), tcfg.max_grad_norm)
        if use_dog:
            accumulate_dog_signal(model)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        global_step += 1
        bar.set_postfix(loss=f"{loss_total:.3f}")
        loss_total = sum_across(world, loss_total, device)
        if world.is_main and ((step + 1) % cfg.output.log_every == 0 or step + 1 == total):
            load = router_load(model)
            mean_load = [sum(col) / len(col) for col in zip(*load.values(), strict=True)] if load else None
            ctx.log.write(
                {
                    "event": "step",
                    "stage": ctx.stage,
                    "stage_name": ctx.stage_name,
                    "step": global_step,
                    "loss": loss_total,
                    "lr": scheduler.get_last_lr()[0],
                    "aux_loss": aux_total,
                    "router_load": mean_load,
                }
            )
        if (
            use_dog
            and regroup_due(step + 1, total, per_epoch, cfg.adapter.dog)
            and len(adapted_layers(model))
        ):
            report = regroup(model, optimizer, probe, cfg.adapter.dog)
            event = {
                "event": "regroup",
                "stage": ctx.stage,
                "step": global_step,
                **report.summary(),
                "layers": report.to_dict()["layers"],
            }
            if world.is_main:
                ctx.log.write(event)
        every = cfg.output.checkpoint_every
        if every and (step + 1) % every == 0 and step + 1 < total:
            progress = {
                **ctx.progress_extra,
                "stage": ctx.stage,
                "stage_step": step + 1,
                "global_step": global_step,
            }
            if world.is_main:
                save_checkpoint(
                    ctx.run_dir, model=model, optimizer=optimizer, scheduler=scheduler, progress=progress
                )
            barrier(world)
        if ctx.interrupt_at is not None and global_step == ctx.interrupt_at:
            raise KeyboardInterrupt(f"interrupted after step {global_step} (test hook)")
    if tcfg.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    return StageResult(global_step, optimizer, scheduler)
