"""What the vLLM Badit classes can serve: checked by `badit-serve` before vLLM starts, by the adapter-set
validation, and by the model classes when they read an export's `badit` block."""

from __future__ import annotations

from badit_serve.core.format import BaditBlock

SERVABLE_TARGETS = ["gate_proj"]
"""The modules whose experts the served routed MLP implements."""


def check_block_servable(block: BaditBlock) -> None:
    """Raise ValueError unless the experts sit on gate_proj only (what the served routed MLP implements)."""
    if list(block.target_modules) != SERVABLE_TARGETS:
        raise ValueError(
            f"badit.target_modules={block.target_modules} cannot be served: the vLLM Badit classes route "
            f"experts on the MLP gate projection only (target_modules must be exactly {SERVABLE_TARGETS})"
        )
