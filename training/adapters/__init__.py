"""Routed ability adapters: BAD-initialised experts, a token router and DOG regrouping.

from training.adapters import AdapterConfig, apply_adapters, regroup
model = apply_adapters(model, AdapterConfig(method="badit"))
...  # loss.backward(); accumulate_dog_signal(model); optimizer.step()
reports = regroup(model, optimizer)
"""

from training.adapters.apply import (
    adapted_layers,
    adapter_state_dict,
    apply_adapters,
    collect_aux_loss,
    layer_spec,
    load_adapter_state_dict,
    router_load,
    trainable_parameters,
)
from training.adapters.config import AdapterConfig, DogConfig
from training.adapters.layer import LayerSpec, RoutedAdapterLinear
from training.adapters.regroup import (
    LayerRegroupReport,
    RegroupReport,
    accumulate_dog_signal,
    regroup,
    reset_dog_signal,
)

__all__ = [
    "AdapterConfig",
    "DogConfig",
    "LayerRegroupReport",
    "LayerSpec",
    "RegroupReport",
    "RoutedAdapterLinear",
    "accumulate_dog_signal",
    "adapted_layers",
    "adapter_state_dict",
    "apply_adapters",
    "collect_aux_loss",
    "layer_spec",
    "load_adapter_state_dict",
    "regroup",
    "reset_dog_signal",
    "router_load",
    "trainable_parameters",
]
