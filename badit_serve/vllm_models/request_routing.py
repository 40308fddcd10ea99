"""Per-request routing on the device: the steering bias every routed layer adds and the capture of the
experts every token was routed to. Both are model-wide buffers, shared by all routed layers like the
real-row count, with static shapes sized for the largest batch:

- `bias` (N, K) float32: row t is added to token t's router logits (`core.steering`: the request's bias,
  -inf on masked experts). Zero rows leave routing bit for bit; the worker (`routed_output`) writes the
  rows of steered requests before a forward pass and zeroes them after.
- `routes` (N, L, W) int32 when the server returns routed experts: each routed layer writes its tokens'
  experts (best first) into its column with `torch.ops.badit.record_routes`, a mutating custom op (like
  `add_routing_stats`: a plain slice assignment would be moved to the end of a compiled graph). The worker
  reads rows [0, T) once per step, where the model runner already waits for the sampled tokens.

Nothing here syncs with the host or depends on the data: the layers read `bias[:T]` and write
`routes[:T, layer]`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from badit_serve.core.steering import SteeringSpec
from badit_serve.vllm_models.routing_stats import LIBRARY
from badit_serve.vllm_models.served_experts import NO_EXPERT


@dataclass
class RequestRoutingBuffers:
    """The model's per-token steering bias and routed-experts capture (see the module docstring)."""

    spec: SteeringSpec
    bias: torch.Tensor
    """(N, K) float32, zeros unless a steered request is in the batch."""
    routes: torch.Tensor | None
    """(N, L, W) int32, or None when routed experts are not returned."""

    @classmethod
    def allocate(
        cls, spec: SteeringSpec, capacity: int, layers: int, capture: bool, device: torch.device | str | None
    ) -> RequestRoutingBuffers:
        """Buffers for batches of up to `capacity` tokens and `layers` routed layers."""
        bias = torch.zeros(capacity, spec.num_experts, dtype=torch.float32, device=device)  # (N, K)
        routes = None
        if capture:
            routes = torch.full((capacity, layers, spec.width), NO_EXPERT, dtype=torch.int32, device=device)
        return cls(spec, bias, routes)


def record_routes(routes: torch.Tensor, layer: int, experts: torch.Tensor) -> None:
    """routes (N, L, W) int32: rows [0, T) of column `layer` = experts (T, W). Registered as
    `torch.ops.badit.record_routes`; call it through the op so torch.compile keeps it where the layer runs."""
    routes[: experts.shape[0], layer].copy_(experts)  # (T, W)


def _register_ops() -> None:
    from vllm.utils.torch_utils import direct_register_custom_op

    direct_register_custom_op(
        "record_routes",
        record_routes,
        mutates_args=["routes"],
        fake_impl=lambda *_: None,
        target_lib=LIBRARY,
    )


_register_ops()


def returns_routed_experts(vllm_config: Any) -> bool:
    """Whether the engine returns routed experts (vLLM's `aux_output_config`, which badit-serve turns on
    for Badit models: `badit_serve.internals.accept_routed_experts_for_badit`)."""
    aux = getattr(vllm_config, "aux_output_config", None)
    return bool(getattr(aux, "enable_return_routed_experts", False))


def routing_capacity(vllm_config: Any) -> int:
    """Tokens of the largest forward pass: the scheduler's token budget, or a CUDA-graph size above it."""
    scheduler = getattr(vllm_config, "scheduler_config", None)
    budget = int(getattr(scheduler, "max_num_batched_tokens", 0) or 0)
    compilation = getattr(vllm_config, "compilation_config", None)
    sizes = [int(size) for size in getattr(compilation, "cudagraph_capture_sizes", None) or []]
    return max([budget, *sizes, 1])


class RoutedLayer(Protocol):
    """What `attach_request_routing` sets on a routed layer (`BaditMLP`, `BaditSlotsGateUp`)."""

    layer_index: int

    def register_buffer(self, name: str, tensor: torch.Tensor | None, persistent: bool = True) -> None: ...


def attach_request_routing(
    adapted: list[str], installed: Mapping[str, RoutedLayer], buffers: RequestRoutingBuffers
) -> None:
    """Give each routed layer installed here the model's buffers, as non-persistent buffers of the layer (so
    torch.compile lifts them as graph inputs, like `num_real`), and its column of `routes`: its place in
    the adapted modules (with pipeline parallelism a stage holds some of them)."""
    for index, name in enumerate(adapted):
        layer = installed.get(name)
        if layer is None:
            continue
        layer.layer_index = index
        layer.register_buffer("steer_bias", buffers.bias, persistent=False)
        layer.register_buffer("routes", buffers.routes, persistent=False)


def layer_steering(
    steer_bias: torch.Tensor | None, routes: torch.Tensor | None, tokens: int
) -> tuple[torch.Tensor | None, int]:
    """A layer's bias rows for a batch of `tokens` (T, K) (None without buffers) and how many experts per
    token to capture (0: none)."""
    bias = None if steer_bias is None else steer_bias[:tokens]  # (T, K)
    return bias, 0 if routes is None else int(routes.shape[2])


def capture_routes(routes: torch.Tensor | None, layer: int, experts: torch.Tensor) -> None:
    """Record a layer's experts (T, W) when the model captures routes (a no-op otherwise)."""
    if routes is not None:
        torch.ops.badit.record_routes(routes, layer, experts)
