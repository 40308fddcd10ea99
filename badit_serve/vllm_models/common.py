"""`BaditCausalLMMixin`: turns a vLLM *ForCausalLM into its Badit counterpart.

Mixed in before the vLLM class (`class BaditLlamaForCausalLM(BaditCausalLMMixin, LlamaForCausalLM)`): it
validates the config's `badit` block, lets the vLLM class build itself, swaps each adapted decoder layer's
MLP for a `BaditMLP` (reusing its fused gate_up_proj, down_proj and activation), and loads the expert
tensors itself while the vLLM loader loads everything else (the residual gate_proj included). After
loading (vLLM's model-level `process_weights_after_loading` hook) every BaditMLP builds the serving form
of its experts in the model dtype.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from badit_serve.adapter import SlotGeometry
from badit_serve.format import BaditBlock
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


class BaditCausalLMMixin:
    """Routed gate_proj experts on top of a vLLM causal LM class (see the module docstring)."""

    badit_block: BaditBlock
    badit_mlps: dict[str, BaditMLP]
    badit_slots: SlotGeometry | None = None
    badit_slot_layers: dict[str, BaditSlotsGateUp]
    badit_dtype: torch.dtype

    def __init__(self, *, vllm_config, prefix: str = "") -> None:  # vllm_config: vllm.config.VllmConfig
        geometry = read_slot_geometry(vllm_config.model_config.hf_config)
        if geometry is not None:  # a plain base with adapter slots (badit-serve BASE --adapter ...)
            use_float32_adapter_tensors(vllm_config)
            super().__init__(vllm_config=vllm_config, prefix=prefix)  # type: ignore[call-arg]
            self.badit_slots, self.badit_slot_layers, self.badit_mlps = geometry, {}, {}
            return
        block = read_badit_block(vllm_config.model_config.hf_config)  # fail before building anything
        super().__init__(vllm_config=vllm_config, prefix=prefix)  # type: ignore[call-arg]
        self.badit_block = block
        self.badit_dtype = vllm_config.model_config.dtype
        self.badit_mlps = install_badit_mlps(self, block)  # type: ignore[arg-type]
        check_coverage(self.badit_mlps, block, self._badit_is_missing)

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
            self.badit_slot_layers = install_slot_layers(self, self.badit_slots)  # type: ignore[arg-type]
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
        return loaded | set(loaded_base)

    def process_weights_after_loading(self) -> None:
        """vLLM's model-level hook after loading: the experts' serving form, in the model dtype."""
        parent = getattr(super(), "process_weights_after_loading", None)
        if parent is not None:
            parent()
        for mlp in self.badit_mlps.values():
            mlp.build_served(self.badit_dtype)
