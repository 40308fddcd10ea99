"""Put routed adapters into a transformers model and get their state in and out."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from badit_serve.core.architectures import SUPPORTED_MODEL_TYPES
from training.adapters.branches import BranchLinear, GatedBranchLinear
from training.adapters.config import AdapterConfig
from training.adapters.layer import LayerSpec, RoutedAdapterLinear, StoredInit

ADAPTER_CONFIG_ATTR = "badit_adapter_config"
LAYER_CLASSES: dict[str | None, type[RoutedAdapterLinear]] = {
    None: RoutedAdapterLinear,
    "sum": BranchLinear,
    "gated": GatedBranchLinear,
}
"""Layer class per branching kind (None: the routed experts of Badit, LoRA, PiSSA, OLoRA, LoRAMoE)."""


def layer_spec(config: AdapterConfig) -> LayerSpec:
    """The per-layer spec that an `AdapterConfig` resolves to. O-LoRA's summed branches are one expert of
    rank branches x r (branch b = rows [b*r, (b+1)*r) of A), which is what makes them a plain servable LoRA."""
    r = config.resolved()
    return LayerSpec(
        num_experts=r.num_experts,
        rank=config.rank * (config.branches.count if r.branching == "sum" else 1),
        top_k=r.top_k,
        scaling=r.alpha / config.rank,
        gate_scale=r.gate_scale,
        router=r.router,
        init="bad-residual" if r.init == "pissa" else r.init,
        dropout=config.dropout,
        branching=r.branching,
        branch_rank=config.rank,
    )


def apply_adapters(
    model: nn.Module,
    config: AdapterConfig,
    seed: int | None = None,
    stored_state: Mapping[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Replace every target nn.Linear by a `RoutedAdapterLinear`; freeze everything else.

    Returns the same model object. `seed` makes router and LoRA initialisation reproducible.
    `stored_state` (an `adapter_state_dict` about to be loaded) lets delta-form layers take their initial
    factors from it instead of recomputing each weight's SVD (`StoredInit`).
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is not None and model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")
    if getattr(model, ADAPTER_CONFIG_ATTR, None) is not None:
        raise ValueError("model already has Badit adapters")
    spec = layer_spec(config)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    for param in model.parameters():
        param.requires_grad_(False)
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in config.target_modules and isinstance(module, nn.Linear)
    ]
    if not targets:
        raise ValueError(f"no nn.Linear named any of {config.target_modules} in {type(model).__name__}")
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        stored = StoredInit.from_state(stored_state, name) if stored_state is not None else None
        layer_cls = LAYER_CLASSES[spec.branching]
        adapted = layer_cls(module, spec, generator=generator, stored=stored).to(module.weight.device)
        adapted.train(module.training)  # a new module defaults to training mode (dropout on)
        setattr(parent, child, adapted)
    setattr(model, ADAPTER_CONFIG_ATTR, config)
    return model


def adapted_layers(model: nn.Module) -> dict[str, RoutedAdapterLinear]:
    """Name -> adapted layer, in module order (names as in the unwrapped model)."""
    return {
        name.removeprefix("module."): module
        for name, module in model.named_modules()
        if isinstance(module, RoutedAdapterLinear)
    }


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that train: experts' A and B and the routers."""
    return [p for p in model.parameters() if p.requires_grad]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything that distinguishes an adapted model from its base: trainable parameters and the
    persistent adapter buffers (A0/B0, component ids, singular values), keyed by full name."""
    state: dict[str, torch.Tensor] = {}
    for name, layer in adapted_layers(model).items():
        for key, value in layer.state_dict().items():
            if not key.startswith("base."):
                state[f"{name}.{key}"] = value.detach().clone()
    return state


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load `adapter_state_dict` output; every key must match a layer tensor of the same shape."""
    layers = adapted_layers(model)
    expected = set(adapter_state_dict(model))
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise KeyError(
            f"adapter state mismatch: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    for name, layer in layers.items():
        prefix = f"{name}."
        own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        layer.load_state_dict(own, strict=False)


def collect_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Mean load-balancing loss over adapted layers from the last forward (None if no layer has one).
    Clears the stored values, so each forward's loss is collected once."""
    losses = []
    for layer in adapted_layers(model).values():
        if layer.last_aux_loss is not None:
            losses.append(layer.last_aux_loss)
            layer.last_aux_loss = None
    return torch.stack(losses).mean() if losses else None


def router_load(model: nn.Module) -> dict[str, list[float]]:
    """Per layer, the fraction of tokens of the last training forward that selected each expert."""
    return {
        name: layer.last_load.tolist()
        for name, layer in adapted_layers(model).items()
        if layer.last_load is not None
    }
