"""The routed experts of a served Badit layer as one opaque custom op, `torch.ops.badit.routed_gate_up`.

    gate_up = torch.ops.badit.routed_gate_up(x, projected, layer_name)   # (T, d_in), (T, 2 * I_local [+ K*R])

The op finds its layer by name (as vLLM's attention and LoRA ops find theirs) and runs the layer's
`routed_gate_up`: float32 router logits, top-k, the weighted expert activations (A' x read from the
projection's extra columns, where A' rides in the base weight), s * B' added to the gate half of a new
[gate | up] tensor, and the routing statistics of the real rows, added to the layer's counters in place.

Why one op: torch.compile sees a single call per layer instead of about twenty operators. The compiled
decoder stack is then the base model's graph plus one extern call per layer, so the time a first start
spends in Dynamo and inductor stays close to the base model's (docs/SERVING.md, "Serving speed"). The counters are written inside the op and read only by the metrics collector outside the
graph, so the compiler needs to know nothing about them. Inside the op everything has a static shape
and nothing reads a device value on the host, so a CUDA graph can capture it as it is.

Layer names are unique among live layers of the process: a second live layer under a name raises.
`install_badit_mlps` gives every model a namespace (`badit0`, `badit1`, ... in build order), so the names
a fresh engine process traces are the same on every start, and vLLM's compile cache stays valid.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Protocol

import torch
from torch.library import Library

LIBRARY = Library("badit", "FRAGMENT")
"""Owns the op (an operator lives as long as its library object)."""


class RoutedLayer(Protocol):
    """What the op needs of a layer (`BaditMLP`)."""

    intermediate_local: int

    def routed_gate_up(self, x: torch.Tensor, projected: torch.Tensor) -> torch.Tensor: ...


_LAYERS: weakref.WeakValueDictionary[str, RoutedLayer] = weakref.WeakValueDictionary()
_MODELS = itertools.count()
_UNNAMED = itertools.count()


def next_model_namespace() -> str:
    """A fresh prefix for one model's layer names: `badit0` for the first model built in the process."""
    return f"badit{next(_MODELS)}"


def unnamed_layer_name() -> str:
    """A unique name for a layer built outside `install_badit_mlps` (tests, tools)."""
    return f"badit_layer{next(_UNNAMED)}"


def register_routed_layer(name: str, layer: RoutedLayer) -> None:
    """Make `layer` the op's target for `name`; a different live layer already there raises ValueError."""
    present = _LAYERS.get(name)
    if present is not None and present is not layer:
        raise ValueError(f"duplicate routed layer name {name!r}: each live BaditMLP needs its own")
    _LAYERS[name] = layer


def routed_layer(name: str) -> RoutedLayer:
    """The live layer registered under `name`."""
    layer = _LAYERS.get(name)
    if layer is None:
        raise KeyError(f"no live routed layer named {name!r} (was its model freed?)")
    return layer


def routed_gate_up(x: torch.Tensor, projected: torch.Tensor, layer_name: str) -> torch.Tensor:
    """x (T, d_in), projected (T, 2 * I_local [+ K*R]) the base projection's [gate | up [| A' x]] -> a new
    (T, 2 * I_local) with the routed delta added to the gate half; adds this pass's routing statistics to
    the layer's counters."""
    return routed_layer(layer_name).routed_gate_up(x, projected)


def _routed_gate_up_fake(x: torch.Tensor, projected: torch.Tensor, layer_name: str) -> torch.Tensor:
    width = 2 * routed_layer(layer_name).intermediate_local
    return projected.new_empty(projected.shape[0], width)  # (T, 2 * I_local)


def _register_op() -> None:
    from vllm.utils.torch_utils import direct_register_custom_op

    direct_register_custom_op(
        "routed_gate_up",
        routed_gate_up,
        mutates_args=[],
        fake_impl=_routed_gate_up_fake,
        target_lib=LIBRARY,
    )


_register_op()
