"""BaditQwen3ForCausalLM: vLLM's Qwen3ForCausalLM with routed gate_proj experts (SiLU MLP).

Qwen3ForCausalLM builds `Qwen3Model` directly (its layers come from `Qwen3Model.decoder_layer_type`, with no
constructor hook), so the mixin swaps the MLPs after construction, as for every family.
"""

from __future__ import annotations

from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM

from badit_serve.vllm_models.common import BaditCausalLMMixin


class BaditQwen3ForCausalLM(BaditCausalLMMixin, Qwen3ForCausalLM):
    """Qwen3 (dense) Badit exports."""
