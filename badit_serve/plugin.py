"""vLLM plugin entry point (`vllm.general_plugins`: badit = "badit_serve.plugin:register").

vLLM calls `register()` in every process it starts (API server, engine core, workers), so the Badit
architectures of an export's config.json resolve to the classes in `badit_serve.vllm_models`. The class
paths are lazy strings: nothing is imported until vLLM builds the model.
"""

from __future__ import annotations

_FAMILY_MODULES: dict[str, str] = {
    "BaditLlamaForCausalLM": "badit_serve.vllm_models.llama",
    "BaditQwen2ForCausalLM": "badit_serve.vllm_models.qwen2",
    "BaditQwen3ForCausalLM": "badit_serve.vllm_models.qwen3",
    "BaditGemma2ForCausalLM": "badit_serve.vllm_models.gemma2",
}
MODEL_CLASSES: dict[str, str] = {arch: f"{module}:{arch}" for arch, module in _FAMILY_MODULES.items()}
"""Badit architecture -> "module:Class" for vLLM's ModelRegistry."""


def register() -> None:
    """Register every Badit architecture with vLLM's ModelRegistry (idempotent)."""
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for arch, target in MODEL_CLASSES.items():
        if arch not in supported:
            ModelRegistry.register_model(arch, target)
