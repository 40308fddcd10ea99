"""BaditGemma2ForCausalLM: vLLM's Gemma2ForCausalLM with routed gate_proj experts.

Gemma2's MLP applies gelu_pytorch_tanh through `GeluAndMul(approximate="tanh")` on the same fused
[gate | up] layout, so the delta goes onto the gate half exactly as for the SiLU families.
"""

from __future__ import annotations

from vllm.model_executor.models.gemma2 import Gemma2ForCausalLM

from badit_serve.vllm_models.common import BaditCausalLMMixin


class BaditGemma2ForCausalLM(BaditCausalLMMixin, Gemma2ForCausalLM):
    """Gemma2 Badit exports."""
