"""The one table of supported model families. Training (which `model_type`s get adapters), the export
format (base architecture -> Badit class in config.json) and the vLLM plugin (Badit class -> module) all
read it, so supporting a new family is one entry here plus its module in `badit_serve.vllm_models`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """One supported model family."""

    model_type: str
    """transformers `config.model_type`, e.g. 'llama'."""
    base_architecture: str
    """The base model's class in `config.architectures`, e.g. 'LlamaForCausalLM'."""
    module: str
    """Module of `badit_serve.vllm_models` that defines the Badit class (imported lazily by vLLM)."""

    @property
    def badit_architecture(self) -> str:
        """The Badit class that serves exports of this family, e.g. 'BaditLlamaForCausalLM'."""
        return f"Badit{self.base_architecture}"


FAMILIES: tuple[Family, ...] = (
    Family("llama", "LlamaForCausalLM", "badit_serve.vllm_models.llama"),
    Family("qwen2", "Qwen2ForCausalLM", "badit_serve.vllm_models.qwen2"),
    Family("qwen3", "Qwen3ForCausalLM", "badit_serve.vllm_models.qwen3"),
    Family("gemma2", "Gemma2ForCausalLM", "badit_serve.vllm_models.gemma2"),
)

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(f.model_type for f in FAMILIES)
"""transformers model types that training can adapt."""
BADIT_ARCHITECTURES: dict[str, str] = {f.base_architecture: f.badit_architecture for f in FAMILIES}
"""Base architecture -> the Badit class that serves it."""
MODEL_CLASSES: dict[str, str] = {f.badit_architecture: f"{f.module}:{f.badit_architecture}" for f in FAMILIES}
"""Badit class -> "module:Class" for vLLM's ModelRegistry."""
