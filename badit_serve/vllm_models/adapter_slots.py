"""Many Badit adapters over one base in one vLLM engine, chosen per request through vLLM's LoRA machinery.

`badit-serve BASE --adapter NAME=DIR ...` starts vLLM with --enable-lora: each adapter is a `LoRARequest`
(resolved from the request's `model` field, listed by /v1/models, kept apart in the prefix cache), and
vLLM's punica wrapper keeps the per-token slot index of every batch (`_token_lora_indices`, -1 = base).
`BaditSlotsGateUp` takes the place of each adapted layer's `gate_up_proj` and consumes those indices with
the Badit routed math in its serving form (`badit_serve.core.routing`: `ServedExperts` with one slot per
adapter, `SlotIndex`, `served_routing`, `add_served_delta`; the single-export `BaditMLP` runs the same
functions with one slot) instead of running LoRA kernels:

- It is a `BaseLayerWithLoRA` built by the model itself, so vLLM's LoRA manager registers it as it is
  (no vLLM wrapper matches it) when --lora-target-modules is gate_up_proj; vLLM's loader hands it each
  adapter's PEFT tensors (`badit_serve.core.adapter`) through `set_lora(slot, [A; router], B)`, in float32
  (`use_float32_adapter_tensors`), where they are refactorised into balanced factors (float64, once per
  load into a slot): router float32, A' and s * B' in the model dtype, like a single export (on CPU
  through vLLM's prepacked oneDNN GEMM, packed again after every slot change).
- Static shapes; slot -1 tokens and padding rows get no delta (vLLM's CPU LoRA ops would apply the last
  slot to -1 tokens, so the slot layer masks them itself).
- Routing statistics per slot, (S, K), counted in the layer's forward (`routing_stats`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import torch
from torch import nn
from vllm.lora.layers import BaseLayerWithLoRA

from badit_serve.core.adapter import LORA_TARGET, SLOTS_CONFIG_KEY, SlotGeometry
from badit_serve.internals import token_lora_indices
from badit_serve.vllm_models.cpu_gemm import prepacked_gemm_factory
from badit_serve.vllm_models.request_routing import capture_routes, layer_steering
from badit_serve.vllm_models.routing_stats import real_rows, record_slot_routing
from badit_serve.vllm_models.served_experts import (
    RoutingSpec,
    ServedExperts,
    SlotIndex,
    SlotShape,
    add_served_delta,
    served_routing,
)

if TYPE_CHECKING:
    from vllm.model_executor.layers.linear import LinearBase

ADAPTER_TENSOR_DTYPE = torch.float32
"""The dtype vLLM's LoRA loader must give adapter tensors (see `use_float32_adapter_tensors`)."""


def use_float32_adapter_tensors(vllm_config: object) -> None:
    """Make vLLM load adapter tensors in float32 whatever the model dtype (its `lora_dtype`).

    vLLM casts every LoRA tensor to `lora_dtype` (the model dtype unless --lora-dtype; its CLI offers only
    float16 / bfloat16) before `set_lora`. The router rows and A ride in lora_A, and the balanced
    refactorisation needs the trained float32 values, so the model class sets `lora_dtype` to float32 on
    the engine's config in the worker, before the worker's LoRA manager (built from the same config after
    the model) loads anything. Nothing else reads it for this layer: it keeps its own buffers.
    """
    lora_config = getattr(vllm_config, "lora_config", None)
    if lora_config is not None:
        lora_config.lora_dtype = ADAPTER_TENSOR_DTYPE


def read_slot_geometry(hf_config: object) -> SlotGeometry | None:
    raw = getattr(hf_config, SLOTS_CONFIG_KEY, None)
    return None if raw is None else SlotGeometry.model_validate(raw)


class BaditSlotsGateUp(BaseLayerWithLoRA):
    """gate_up_proj + per-token routed delta on the gate half, one adapter slot per LoRA slot."""

    steer_bias: torch.Tensor | None
    routes: torch.Tensor | None
    quant_method = None
    """The wrapped base layer is post-processed as its own module; without this, BaseLayerWithLoRA's
    attribute forwarding would make vLLM process (and repack) the same weights twice."""
    embedding_modules = {LORA_TARGET: LORA_TARGET}
    """vLLM's LoRA manager lists the module names adapters may target from LinearBase modules and from the
    keys of any module's `embedding_modules` (vllm/lora/utils.py); this layer is not a LinearBase (its base
    layer is), so it names itself here: adapters' `gate_proj` tensors then pack into it."""

    def __init__(
        self,
        base_layer: LinearBase,
        geometry: SlotGeometry,
        tp_rank: int,
        num_real: torch.Tensor,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.geometry, self.tp_rank = geometry, tp_rank
        slots, k = geometry.max_adapters, geometry.num_experts
        self.n = k * geometry.rank
        num_router = 0 if geometry.router == "none" else k
        self.rows = self.n + num_router
        # vLLM's LinearBase infers output_partition_sizes from an untyped attribute (Tensor | Module).
        self.intermediate_local = int(base_layer.output_partition_sizes[0])  # type: ignore[index]
        self.n_slices = 2
        d_in = int(base_layer.input_size)
        # The serving dtype is the layer's activation dtype, not its weight's: over a quantised base the
        # weight is int8 or packed int4 (its name differs too), and the routed path stays in the model dtype.
        dtype, device = base_layer.params_dtype, next(base_layer.parameters()).device
        # vLLM folds scaling * gate_scale into lora_B (the adapter's lora_alpha / r): routing weights are
        # plain softmax weights here.
        self.spec = RoutingSpec(k, geometry.top_k, geometry.router, gate_scale=1.0)  # type: ignore[arg-type]
        shape = SlotShape(num_router, self.n, d_in, self.intermediate_local)
        self.served = ServedExperts.empty_slots(slots, shape, dtype, device)
        # On CPU packed again at every slot change (LoRA serving runs eager there).
        self.served.use_gemm(prepacked_gemm_factory(device))
        self.register_buffer(
            "expert_tokens", torch.zeros(slots, k, dtype=torch.int64, device=device), persistent=False
        )
        self.register_buffer(
            "router_weight_sums",
            torch.zeros(slots, k, dtype=torch.float64, device=device),
            persistent=False,
        )
        # Shapes vLLM reads to build its zero warm-up adapters (create_dummy_lora); never computed with.
        self.lora_a_stacked = tuple(
            torch.empty(slots, 1, self.n, d_in, dtype=ADAPTER_TENSOR_DTYPE, device="meta") for _ in range(2)
        )
        self.lora_b_stacked = tuple(
            torch.empty(slots, 1, self.intermediate_local, self.n, dtype=ADAPTER_TENSOR_DTYPE, device="meta")
            for _ in range(2)
        )
        # Called with (slot) when a slot's adapter changes (expert metrics).
        self.slot_listener: Callable[[int], None] | None = None
        self.built = BuiltAdapters()
        """Each adapter's serving form, built once while vLLM's host cache holds its tensors."""
        self.record_stats = True
        # The model's shared real-row count (routing_stats.count_real_tokens).
        self.register_buffer("num_real", num_real, persistent=False)
        # The model's steering bias (N, K) and routes capture (N, L, W), set by `attach_request_routing`.
        self.register_buffer("steer_bias", None, persistent=False)
        self.register_buffer("routes", None, persistent=False)
        self.layer_index = 0
        """This layer's column in the captured routes: its place in the adapted modules."""

    def reset_lora(self, index: int) -> None:
        self._notify(index)
        self.served.reset_slot(index)

    def set_lora(  # lists [gate, up] from PackedLoRALayerWeights
        self,
        index: int,
        lora_a: torch.Tensor | list[torch.Tensor],
        lora_b: torch.Tensor | list[torch.Tensor],
    ) -> None:
        a = lora_a[0] if isinstance(lora_a, (list, tuple)) else lora_a
        b = lora_b[0] if isinstance(lora_b, (list, tuple)) else lora_b
        d_in = self.served.lora_a.shape[1]
        if a is None or b is None or (tuple(a.shape) != (self.rows, d_in) and not a.any()):
            self.reset_lora(index)  # vLLM's zero warm-up adapters
            return
        full_out = self.intermediate_local * self.base_layer.tp_size
        if tuple(a.shape) != (self.rows, d_in) or tuple(b.shape) != (full_out, self.n):
            raise ValueError(
                f"Badit adapter tensors lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the "
                f"slot shapes ({self.rows}, {d_in}) / ({full_out}, {self.n})"
            )
        self._notify(index)
        self.served.set_slot(index, self.built.get(a, b, lambda: self._build(a, b)))

    def _build(self, a: torch.Tensor, b: torch.Tensor) -> ServedExperts:
        """The serving form of one adapter's tensors: float64 refactorisation, on the loader's device (CPU)."""
        b_local = b.narrow(0, self.tp_rank * self.intermediate_local, self.intermediate_local)  # (I_local, n)
        router = a[self.n :] if self.rows > self.n else None  # (K, d_in) or None
        return ServedExperts.build(
            router, a[: self.n], b_local, 1.0, self.geometry.num_experts, self.served.lora_b.dtype
        )

    def _notify(self, index: int) -> None:
        if self.slot_listener is not None:
            self.slot_listener(index)

    def token_slots(self, tokens: int) -> SlotIndex:
        """This batch's per-token slots, from vLLM's punica wrapper (-1 = base model) and the padding mask."""
        indices = token_lora_indices(self.punica_wrapper, tokens)  # (T,) -1 = base model
        real = real_rows(tokens, self.num_real)  # (T,)
        return SlotIndex.of(indices, self.served.num_slots, real)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        gate_up, bias = self.base_layer(x)  # (T, 2 * I_local)
        flat = x.reshape(-1, x.shape[-1])  # (T, d_in)
        slots = self.token_slots(flat.shape[0])
        steer, width = layer_steering(self.steer_bias, self.routes, flat.shape[0])  # (T, K) or None
        weights, selected, weighted, experts = served_routing(
            flat, self.served, self.spec, slots, steer, width
        )  # (T, K) x2, (T, n), (T, W)
        capture_routes(self.routes, self.layer_index, experts)
        if self.record_stats:
            record_slot_routing(slots.slot, selected, weights, self.expert_tokens, self.router_weight_sums)
        gate = gate_up.view(-1, gate_up.shape[-1])[:, : self.intermediate_local]  # (T, I_local) view
        add_served_delta(gate, weighted, self.served, slots)  # (T, I_local), in place
        return gate_up, bias


class BuiltAdapters:
    """The serving form (`ServedExperts.build`) of each adapter's tensors, made once per tensor object.

    vLLM's LoRA manager hands `set_lora` the tensors of its host cache (`LoRAModel`) every time it activates
    an adapter in a slot; the float64 refactorisation of the default model's 30 layers took 250 ms of each
    0.44 s activation (`benchmarks/slot_activation.py`, docs/RESULTS.md). The result is kept under the identity of the tensor
    objects and dropped when vLLM frees them (evicted from host memory): a new tensor at a reused address
    is a new object and is built anew, never matched with another adapter's form. Costs host memory equal
    to the cached adapters' expert tensors."""

    def __init__(self) -> None:
        self._built: dict[int, tuple[int, ServedExperts]] = {}
        self.builds = 0

    def get(self, a: torch.Tensor, b: torch.Tensor, build: Callable[[], ServedExperts]) -> ServedExperts:
        """`build()` once for the pair (a, b) while `a` lives."""
        key = id(a)
        hit = self._built.get(key)
        if hit is not None and hit[0] == id(b):
            return hit[1]
        served = build()
        self.builds += 1
        if hit is None:
            weakref.finalize(a, self._built.pop, key, None)
        self._built[key] = (id(b), served)
        return served

    def __len__(self) -> int:
        return len(self._built)


def install_slot_layers(
    model: nn.Module, geometry: SlotGeometry, num_real: torch.Tensor
) -> dict[str, BaditSlotsGateUp]:
    """Wrap the gate_up_proj of every adapted layer (after the base weights are loaded and before vLLM's
    LoRA manager is built); each reads the model's shared real-row count `num_real`. Returns adapted gate
    module name -> layer."""
    from vllm.distributed import get_tensor_model_parallel_rank

    tp_rank = get_tensor_model_parallel_rank()
    installed: dict[str, BaditSlotsGateUp] = {}
    for gate_name in geometry.adapted_modules:
        mlp_name = gate_name.removesuffix(".gate_proj")
        try:
            mlp = model.get_submodule(mlp_name)
        except AttributeError:
            continue  # a layer of another pipeline stage
        if not hasattr(mlp, LORA_TARGET):
            raise ValueError(
                f"{mlp_name} ({type(mlp).__name__}) has no gate_up_proj: cannot serve Badit adapters"
            )
        # A Module's child is typed Tensor | Module; vLLM builds gate_up_proj as a MergedColumnParallelLinear.
        layer = BaditSlotsGateUp(cast("LinearBase", mlp.gate_up_proj), geometry, tp_rank, num_real)
        mlp.gate_up_proj = layer
        installed[gate_name] = layer
    return installed
