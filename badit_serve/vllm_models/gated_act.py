"""Gated activations applied to the gate and up halves as two tensors.

vLLM's MLPs hand `act_fn` one (T, 2 * I) tensor [gate | up]. `BaditMLP` has its two halves apart (the gate
half plus the routed delta, and the up half); concatenating them only to split them again materialises a
(T, 2 * I) copy, which inductor does not fuse away (scratch microbenchmark at the default model's shapes,
2,048 tokens, bfloat16, one thread: 4.9-5.5 ms per layer for add + cat + activation against 2.8-3.0 ms
for the activation on the halves).

`gated_activation(act_fn)` is the two-tensor form of a known vLLM activation module, with the math of its
`forward_native` (what vLLM runs on CPU and under inductor), or None for any other activation, which then
gets the concatenation. A new activation is a table entry.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

GatedActivation = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(gate (..., I), up (..., I)) -> (..., I)."""


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up  # (..., I)


def gelu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.gelu(gate, approximate="none") * up  # (..., I)


def gelu_tanh_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.gelu(gate, approximate="tanh") * up  # (..., I)


@functools.cache
def _table() -> dict[tuple[type, str | None], GatedActivation]:
    """(vLLM activation class, its `approximate` or None) -> the two-tensor form. Module-level functions,
    the same object for every layer, so the routed MLP region traced for one layer is reused by all."""
    from vllm.model_executor.layers.activation import GeluAndMul, SiluAndMul

    return {
        (SiluAndMul, None): silu_and_mul,
        (GeluAndMul, "none"): gelu_and_mul,
        (GeluAndMul, "tanh"): gelu_tanh_and_mul,
    }


def gated_activation(act_fn: object) -> GatedActivation | None:
    """The two-tensor form of `act_fn`, or None where it is not in the table (or on ROCm, where vLLM's
    native GeluAndMul swaps tanh for the exact GELU: the concatenation keeps its behaviour there)."""
    from vllm.platforms import current_platform

    if current_platform.is_rocm():
        return None
    return _table().get((type(act_fn), getattr(act_fn, "approximate", None)))
