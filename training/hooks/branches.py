"""Trainer hook of the per-task-branch methods (O-LoRA, GainLoRA); installed from `training.hooks.registry.HOOK_FACTORIES`.

on_stage_start     check a branch is left; GainLoRA: the new gate's key is the direction of most
                   energy in this task's inputs orthogonal to earlier tasks' (initialisation constraint);
                   every branch but the current one stops receiving gradients. On a resumed stage the
                   checkpoint restored afterwards overwrites the key, the basis and the branch counter.
extra_loss         O-LoRA's orthogonality term (also under GainLoRA: GainLoRA on O-LoRA branches)
before_optimizer   first call of a stage: remember the frozen rows (after any resume restored them)
after_step         frozen rows put back exactly (AdamW's weight decay would otherwise shrink them);
                   GainLoRA: the current key projected off earlier tasks' subspace (updating constraint)
on_stage_end       GainLoRA: earlier-task subspace extended with this task's inputs (GPM); branch done
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from training.adapters import adapted_layers
from training.adapters.branches import (
    BranchLinear,
    GatedBranchLinear,
    extend_basis,
    orthogonality_loss,
    project_out,
    top_direction,
)
from training.adapters.config import BranchConfig
from training.data import TrainExample, collate_train
from training.hooks.base import TrainerHook, TrainState


def branch_layers(model: nn.Module) -> dict[str, BranchLinear]:
    return {name: layer for name, layer in adapted_layers(model).items() if isinstance(layer, BranchLinear)}


@torch.no_grad()
def input_grams(
    model: nn.Module, examples: list[TrainExample], pad_id: int, batch_size: int = 8
) -> dict[str, torch.Tensor]:
    """Per gated layer, the Gram sum_x x x^T (d_in, d_in, float64) of its inputs over the examples' tokens."""
    layers = {n: m for n, m in branch_layers(model).items() if isinstance(m, GatedBranchLinear)}
    grams = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in layers.items()}
    if not layers:
        return grams
    captured: dict[str, torch.Tensor] = {}
    handles = [
        m.register_forward_pre_hook(lambda _m, args, name=name: captured.__setitem__(name, args[0]))
        for name, m in layers.items()
    ]
    body = model.model  # the causal LM's decoder stack: no logits needed
    assert isinstance(body, nn.Module)
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    try:
        for k in range(0, len(examples), batch_size):
            batch = collate_train(examples[k : k + batch_size], pad_id)
            mask = batch["attention_mask"].bool()  # (B, L)
            body(input_ids=batch["input_ids"].to(device), attention_mask=mask.long().to(device))
            for name, x in captured.items():
                tokens = x[mask.to(x.device)].double().cpu()  # (N, d_in)
                grams[name] += tokens.t() @ tokens
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return grams


class BranchHook(TrainerHook):
    """Per-task branches through the stages of a run (see the module docstring)."""

    def __init__(self, settings: BranchConfig):
        self.settings = settings
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.frozen: dict[str, dict[str, torch.Tensor]] | None = None

    def on_stage_start(self, state: TrainState) -> None:
        layers = branch_layers(state.model)
        for layer in layers.values():
            if int(layer.branches_done) >= layer.num_branches:
                raise ValueError(
                    f"all {layer.num_branches} per-task branches are trained: "
                    "adapter.branches.count must be at least the number of sequential stages"
                )
        for name, gram in input_grams(state.model, state.examples, state.pad_id).items():
            _init_key(layers[name], gram)
        for layer in layers.values():
            self.handles += _mask_gradients(layer)
        self.frozen = None

    def extra_loss(self, state: TrainState) -> torch.Tensor | None:
        if self.settings.orthogonal_lambda == 0:
            return None
        terms = [
            orthogonality_loss(layer.lora_a, int(layer.branches_done), layer.spec.branch_rank)
            for layer in branch_layers(state.model).values()
            if int(layer.branches_done) > 0
        ]
        return self.settings.orthogonal_lambda * torch.stack(terms).sum() if terms else None

    def before_optimizer(self, state: TrainState) -> None:
        if self.frozen is None:
            self.frozen = {
                name: {key: p.detach().clone() for key, p in _branch_params(layer).items()}
                for name, layer in branch_layers(state.model).items()
            }

    @torch.no_grad()
    def after_step(self, state: TrainState) -> None:
        for name, layer in branch_layers(state.model).items():
            for key, param in _branch_params(layer).items():
                index = _current(layer, key)
                current = param[index].clone()
                assert self.frozen is not None  # remembered by before_optimizer, which runs first
                param.copy_(self.frozen[name][key])
                param[index] = current
            if isinstance(layer, GatedBranchLinear):
                b = int(layer.branches_done)
                assert layer.router is not None  # the gate keys
                layer.router.weight[b] = project_out(layer.router.weight[b], layer.basis())

    def on_stage_end(self, state: TrainState) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        layers = branch_layers(state.model)
        for name, gram in input_grams(state.model, state.examples, state.pad_id).items():
            layer = layers[name]
            assert isinstance(layer, GatedBranchLinear)
            layer.set_basis(extend_basis(layer.basis().double(), gram, self.settings.gate_energy).float())
        for layer in layers.values():
            layer.branches_done += 1


@torch.no_grad()
def _init_key(layer: BranchLinear, gram: torch.Tensor) -> None:
    """Initialisation constraint: the new key is orthogonal to earlier tasks' input subspace, along the
    direction that carries most of this task's input energy there (so its gate opens on this task)."""
    assert isinstance(layer, GatedBranchLinear) and layer.router is not None
    key = layer.router.weight[int(layer.branches_done)]  # (d_in,)
    direction = top_direction(gram, layer.basis().double()).float()  # (d_in,)
    key.copy_(direction * key.norm())  # the gate reads cos(x, k); keep the init's norm for the optimiser


def _branch_params(layer: BranchLinear) -> dict[str, torch.Tensor]:
    params: dict[str, torch.Tensor] = {"lora_a": layer.lora_a, "lora_b": layer.lora_b}
    if isinstance(layer, GatedBranchLinear):
        assert layer.router is not None  # the gate keys
        params["router"] = layer.router.weight
    return params


def _current(layer: BranchLinear, key: str) -> tuple[slice, ...]:
    """Index of the current branch in a branch parameter: rows of A, columns of B, one row of the keys."""
    b, rows = int(layer.branches_done), layer.trainable_rows()
    return {"lora_a": (rows,), "lora_b": (slice(None), rows), "router": (slice(b, b + 1),)}[key]


def _mask_gradients(layer: BranchLinear) -> list[torch.utils.hooks.RemovableHandle]:
    """Zero the gradient of every branch but the current one."""

    def masked(key: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def hook(grad: torch.Tensor) -> torch.Tensor:
            index = _current(layer, key)
            out = torch.zeros_like(grad)
            out[index] = grad[index]
            return out

        return hook

    # torch's Tensor.register_hook is unannotated
    return [param.register_hook(masked(key)) for key, param in _branch_params(layer).items()]  # type: ignore[no-untyped-call]
