"""vLLM plugin entry point (`vllm.general_plugins`: badit = "badit_serve.plugin:register").

vLLM calls `register()` in every process it starts (API server, engine core, workers), so the Badit
architectures of an export's config.json resolve to the classes in `badit_serve.vllm_models`. The class
paths are lazy strings: nothing is imported until vLLM builds the model.
"""

from __future__ import annotations

from badit_serve.core.adapter import SLOTS_CONFIG_KEY
from badit_serve.core.architectures import MODEL_CLASSES
from badit_serve.internals import accept_routed_experts_for_badit, check_vllm_version

__all__ = ["MODEL_CLASSES", "register"]


def register() -> None:
    """Check that vLLM is a tested version (`badit_serve.internals.check_vllm_version`), register every
    Badit architecture with vLLM's ModelRegistry, and let `--enable-return-routed-experts` through for Badit
    models (`badit_serve.internals.accept_routed_experts_for_badit`; idempotent)."""
    from vllm import ModelRegistry

    check_vllm_version()

    accept_routed_experts_for_badit(is_badit_config)
    supported = set(ModelRegistry.get_supported_archs())
    for arch, target in MODEL_CLASSES.items():
        if arch not in supported:
            ModelRegistry.register_model(arch, target)


def is_badit_config(hf_config: object) -> bool:
    """A Badit export (its `badit` block) or a base served with Badit adapter slots."""
    return (
        isinstance(getattr(hf_config, "badit", None), dict)
        or getattr(hf_config, SLOTS_CONFIG_KEY, None) is not None
    )
