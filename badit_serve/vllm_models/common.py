"""`BaditCausalLMMixin`: turns a vLLM *ForCausalLM into its Badit counterpart.

Mixed in before the vLLM class (`class BaditLlamaForCausalLM(BaditCausalLMMixin, LlamaForCausalLM)`): it
validates the config's `badit` block, lets the vLLM class build itself, swaps each adapted decoder layer's
MLP for a `BaditMLP` (reusing its fused gate_up_proj, down_proj and activation), and loads the expert
tensors itself while the vLLM loader loads everything else (the residual gate_proj included). Once the
checkpoint is loaded every BaditMLP builds the serving form of its experts in the model dtype (and appends
A' to its gate_up_proj weight before vLLM post-processes the linear layers); after vLLM's post-processing
(its model-level `process_weights_after_loading` hook) it makes the experts' Gemms.

Its forward runs outside the compiled decoder stack (vLLM compiles the inner *Model): before each pass it
writes the number of real (non-padding) rows into the one tensor every routed layer reads
(`routing_stats.count_real_tokens`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from badit_serve.core.adapter import SlotGeometry
from badit_serve.core.format import BaditBlock
from badit_serve.core.steering import SteeringSpec
from badit_serve.vllm_models.adapter_slots import (
    BaditSlotsGateUp,
    install_slot_layers,
    read_slot_geometry,
    use_float32_adapter_tensors,
)
from badit_serve.vllm_models.mlp import (
    BaditMLP,
    check_coverage,
    expected_expert_names,
    install_badit_mlps,
    read_badit_block,
    split_expert_weights,
)
from badit_serve.vllm_models.request_routing import (
    RequestRoutingBuffers,
    RoutedLayer,
    attach_request_routing,
    returns_routed_experts,
    routing_capacity,
)
from badit_serve.vllm_models.routing_stats import count_real_tokens, new_real_row_count

if TYPE_CHECKING:
    from vllm.config import VllmConfig


class BaditCausalLMMixin:
    """Routed gate_proj experts on top of a vLLM causal LM class (see the module docstring)."""

    badit_block: BaditBlock
    badit_mlps: dict[str, BaditMLP]
    badit_slots: SlotGeometry | None = None
    badit_slot_layers: dict[str, BaditSlotsGateUp]
    badit_dtype: torch.dtype
    badit_num_real: torch.Tensor
    """0-dim int64: this forward pass's real (non-padding) rows, read by every routed layer."""
    badit_vllm_config: VllmConfig
    badit_requests: RequestRoutingBuffers | None = None
    """The per-request steering bias and routes capture every routed layer reads (`request_routing`)."""
    badit_step_hook: Callable[[], None] | None = None
    """Called before each forward pass (outside the compiled stack): the worker's per-request routing
    writes the steering rows of the batch (`routed_output`, installed by the worker extension)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        geometry = read_slot_geometry(vllm_config.model_config.hf_config)
        if geometry is not None:  # a plain base with adapter slots (badit-serve BASE --adapter ...)
            use_float32_adapter_tensors(vllm_config)
            super().__init__(vllm_config=vllm_config, prefix=prefix)  # type: ignore[call-arg]
            self.badit_vllm_config = vllm_config
            self.badit_slots, self.badit_slot_layers, self.badit_mlps = geometry, {}, {}
            self._badit_register_row_count()
            return
        block = read_badit_block(vllm_config.model_config.hf_config)  # fail before building anything
        super().__init__(vllm_config=vllm_config, prefix=prefix)  # type: ignore[call-arg]
        self.badit_vllm_config = vllm_config
        self.badit_block = block
        dtype = vllm_config.model_config.dtype
        assert isinstance(dtype, torch.dtype)  # ModelConfig resolves "auto" and names to a torch.dtype
        self.badit_dtype = dtype
        self._badit_register_row_count()
        self.badit_mlps = install_badit_mlps(self, block, self.badit_num_real)  # type: ignore[arg-type]
        check_coverage(self.badit_mlps, block, self._badit_is_missing)
        self._badit_attach_requests(SteeringSpec.of(block), block.adapted_modules, self.badit_mlps)

    def _badit_attach_requests(
        self, spec: SteeringSpec, adapted: list[str], installed: Mapping[str, RoutedLayer]
    ) -> None:
        """The model's per-request routing buffers (routes captured when the engine returns routed
        experts), given to every routed layer here in adapted-module order."""
        config = self.badit_vllm_config
        self.badit_requests = RequestRoutingBuffers.allocate(
            spec,
            routing_capacity(config),
            len(adapted),
            capture=returns_routed_experts(config),
            device=self.badit_num_real.device,
        )
        attach_request_routing(adapted, installed, self.badit_requests)

    def _badit_register_row_count(self) -> None:
        # Built under vLLM's target-device context, like the model's parameters.
        self.register_buffer("badit_num_real", new_real_row_count(), persistent=False)  # type: ignore[attr-defined]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The vLLM class's forward, after writing this pass's real-row count for the routed layers."""
        count_real_tokens(self.badit_num_real)
        if self.badit_step_hook is not None:
            self.badit_step_hook()
        return super().forward(*args, **kwargs)  # type: ignore[misc]

    def _badit_is_missing(self, name: str) -> bool:
        """True for names of layers that live on another pipeline-parallel rank."""
        from vllm.model_executor.models.utils import is_pp_missing_parameter

        return is_pp_missing_parameter(name, self)  # type: ignore[arg-type]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Expert tensors (`*.badit_*`) into the BaditMLPs, everything else through the vLLM loader. With
        adapter slots: the base weights, then each adapted gate_up_proj wrapped (adapters come later,
        through vLLM's LoRA manager)."""
        if self.badit_slots is not None:
            loaded_base = super().load_weights(weights)  # type: ignore[misc]
            geometry = self.badit_slots
            self.badit_slot_layers = install_slot_layers(self, geometry, self.badit_num_real)  # type: ignore[arg-type]
            self._badit_attach_requests(
                SteeringSpec.of(geometry), geometry.adapted_modules, self.badit_slot_layers
            )
            return set(loaded_base)
        params = dict(self.named_parameters())  # type: ignore[attr-defined]
        loaded: set[str] = set()
        base = split_expert_weights(weights, params, self._badit_is_missing, loaded)
        loaded_base = super().load_weights(base)  # type: ignore[misc]
        missing = [
            n
            for n in expected_expert_names(self.badit_block)
            if n not in loaded and not self._badit_is_missing(n)
        ]
        if missing:
            raise ValueError(f"expert tensor(s) {missing[:3]} missing from the checkpoint")
        for mlp in self.badit_mlps.values():  # before vLLM post-processes (prepacks) gate_up_proj
            mlp.prepare_served(self.badit_dtype)
        return loaded | set(loaded_base)

    def process_weights_after_loading(self) -> None:
        """vLLM's model-level hook after its per-layer post-processing: the experts' Gemms."""
        parent = getattr(super(), "process_weights_after_loading", None)
        if parent is not None:
            parent()
        for mlp in self.badit_mlps.values():
            mlp.finish_served()
