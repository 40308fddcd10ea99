"""DOG at model level: accumulate the component signal, regroup every layer, move optimiser state."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from training.adapters.apply import ADAPTER_CONFIG_ATTR, adapted_layers
from training.adapters.config import DogConfig
from training.adapters.dog import (
    dog_grouping,
    gradient_angles,
    host64,
    labels_to_permutation,
    match_groups,
    normalize_rows,
)
from training.adapters.layer import RoutedAdapterLinear
from training.loss import mean_token_kl


@dataclass
class LayerRegroupReport:
    """What one layer's regroup did."""

    layer: str
    moved: int
    """Components that changed expert."""
    iterations: int
    converged: bool
    signal_steps: int
    """Optimiser steps whose gradients formed the signal."""
    intra_before: float
    inter_before: float
    intra_after: float
    inter_after: float
    """Mean intra-/inter-expert gradient angles in degrees (the paper's Fig. 4), before and after."""


@dataclass
class RegroupReport:
    """All layers' reports plus the function drift on the probe batch."""

    layers: list[LayerRegroupReport] = field(default_factory=list)
    kl_drift: float | None = None
    """Mean KL(before || after) of next-token distributions on the probe batch (None without a probe)."""

    @property
    def moved(self) -> int:
        return sum(r.moved for r in self.layers)

    def mean(self, key: str) -> float:
        values = [getattr(r, key) for r in self.layers]
        return sum(values) / len(values) if values else float("nan")

    def summary(self) -> dict[str, Any]:
        """Flat numbers for metrics.jsonl."""
        keys = ("intra_before", "inter_before", "intra_after", "inter_after")
        return {"moved": self.moved, "kl_drift": self.kl_drift, **{k: self.mean(k) for k in keys}}

    def to_dict(self) -> dict[str, Any]:
        return {**self.summary(), "layers": [asdict(r) for r in self.layers]}


def accumulate_dog_signal(model: nn.Module) -> None:
    """Call after backward (and after any data-parallel all-reduce), before the optimiser step."""
    for layer in adapted_layers(model).values():
        layer.accumulate_dog_signal()


def reset_dog_signal(model: nn.Module) -> None:
    """Zero every layer's accumulated signal, so the next regroup sees only gradients from now on."""
    for layer in adapted_layers(model).values():
        layer.reset_dog_signal()


@torch.no_grad()
def _next_token_log_probs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
    finally:
        model.train(was_training)
    return torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)


def _permute_optimizer_state(
    optimizer: torch.optim.Optimizer, layer: RoutedAdapterLinear, perm: torch.Tensor
) -> None:
    """Per-entry optimiser state (e.g. AdamW's exp_avg, exp_avg_sq) follows its component."""
    for param, dim in ((layer.lora_a, 0), (layer.lora_b, 1)):
        state = optimizer.state.get(param, {})
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == param.shape:
                state[key] = value.index_select(dim, perm.to(value.device))


def _regroup_layer(
    name: str, layer: RoutedAdapterLinear, optimizer: torch.optim.Optimizer | None, config: DogConfig
) -> LayerRegroupReport | None:
    k, r = layer.spec.num_experts, layer.spec.rank
    steps = int(layer.dog_steps)
    if steps == 0 or k == 1:
        return None
    signal = normalize_rows(host64(layer.dog_signal()))  # (K*r, d_in + d_out) on the CPU, float64
    current = torch.arange(k * r) // r  # (K*r,) slot j belongs to expert j // r
    result = dog_grouping(
        signal,
        k,
        r,
        max_iters=config.max_iters,
        kmeans_iters=config.kmeans_iters,
        seed=config.seed,
        restarts=config.restarts,
    )
    new_labels = match_groups(current, result.labels, k)
    perm = labels_to_permutation(new_labels, k, r)  # (K*r,)
    if dist.is_available() and dist.is_initialized():  # identical decisions on every rank, by construction
        perm = perm.to(layer.lora_a.device)
        dist.broadcast(perm, src=0)
        perm = perm.cpu()
    intra_before, inter_before = gradient_angles(signal, current, k)
    intra_after, inter_after = gradient_angles(signal[perm], current, k)
    moved = int((new_labels != current).sum())
    layer.permute_components(perm.to(layer.lora_a.device))
    if optimizer is not None:
        _permute_optimizer_state(optimizer, layer, perm)
    return LayerRegroupReport(
        layer=name,
        moved=moved,
        iterations=result.iterations,
        converged=result.converged,
        signal_steps=steps,
        intra_before=intra_before,
        inter_before=inter_before,
        intra_after=intra_after,
        inter_after=inter_after,
    )


def regroup(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    probe_batch: dict[str, torch.Tensor] | None = None,
    config: DogConfig | None = None,
) -> RegroupReport:
    """Regroup every adapted layer from its accumulated signal (layers without signal are left alone).

    The result is applied as one permutation of components per layer, so the multiset of rank-1
    components is unchanged; the optimiser's per-entry state moves with them.
    """
    if config is None:
        adapter_config = getattr(model, ADAPTER_CONFIG_ATTR, None)
        config = adapter_config.dog if adapter_config is not None else DogConfig()
    before = _next_token_log_probs(model, probe_batch) if probe_batch is not None else None
    report = RegroupReport()
    for name, layer in adapted_layers(model).items():
        layer_report = _regroup_layer(name, layer, optimizer, config)
        if layer_report is not None:
            report.layers.append(layer_report)
    if before is not None and probe_batch is not None:  # before is measured iff there is a probe batch
        after = _next_token_log_probs(model, probe_batch)
        report.kl_drift = mean_token_kl(before, after, probe_batch.get("attention_mask"))
    return report
