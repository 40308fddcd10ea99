"""vLLM plugin entry point (`vllm.general_plugins`: badit = "badit_serve.plugin:register").

vLLM calls `register()` in every process it starts (API server, engine core, workers), so the Badit
architectures of an export's config.json resolve to the classes in `badit_serve.vllm_models`. The class
paths are lazy strings: nothing is imported until vLLM builds the model.
"""

from __future__ import annotations

from badit_serve.core.architectures import MODEL_CLASSES
from badit_serve.internals import check_vllm_version

__all__ = ["MODEL_CLASSES", "register"]


def register() -> None:
    """Check that vLLM is a tested version (`badit_serve.internals.check_vllm_version`), then register every
    Badit architecture with vLLM's ModelRegistry (idempotent)."""
    from vllm import ModelRegistry

    check_vllm_version()

    supported = set(ModelRegistry.get_supported_archs())
    for arch, target in MODEL_CLASSES.items():
        if arch not in supported:
            ModelRegistry.register_model(arch, target)
