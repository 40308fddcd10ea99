"""BaditLlamaForCausalLM: vLLM's LlamaForCausalLM with routed gate_proj experts (SiLU MLP)."""

from __future__ import annotations

from vllm.model_executor.models.llama import LlamaForCausalLM

from badit_serve.vllm_models.common import BaditCausalLMMixin


class BaditLlamaForCausalLM(BaditCausalLMMixin, LlamaForCausalLM):
    """Llama (and SmolLM2) Badit exports."""
