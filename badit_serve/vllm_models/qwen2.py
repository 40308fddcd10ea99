"""BaditQwen2ForCausalLM: vLLM's Qwen2ForCausalLM with routed gate_proj experts (SiLU MLP)."""

from __future__ import annotations

from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

from badit_serve.vllm_models.common import BaditCausalLMMixin


class BaditQwen2ForCausalLM(BaditCausalLMMixin, Qwen2ForCausalLM):
    """Qwen2 / Qwen2.5 Badit exports."""
