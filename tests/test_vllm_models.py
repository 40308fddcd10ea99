"""The vLLM plugin registers a Badit model class for every export architecture."""

from __future__ import annotations

from badit_serve.core.architectures import BADIT_ARCHITECTURES


def test_plugin_registers_every_export_architecture() -> None:
    from vllm import ModelRegistry

    from badit_serve.plugin import register

    register()
    register()  # idempotent
    assert set(BADIT_ARCHITECTURES.values()) <= set(ModelRegistry.get_supported_archs())
