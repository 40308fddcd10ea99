"""Routed experts as a client and the reference loader see them (per-request routing tests)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from badit_serve.api.abilities import decode_routed_experts
from badit_serve.core.reference import last_routed_experts, set_steering

NO_EXPERT_U8 = 255
"""A token routed through no expert, in the uint8 encoding of a model with fewer than 255 experts."""


@torch.no_grad()
def reference_routes(
    model: nn.Module, tokens: list[int], bias: tuple[float, ...] | None = None
) -> np.ndarray:
    """(len(tokens), layers, W) the experts of every token and routed layer of a reference model, steered by
    `bias` (a `Steering.bias`), best first."""
    set_steering(model, bias)
    try:
        model(torch.tensor([tokens]))
        return last_routed_experts(model).numpy()
    finally:
        set_steering(model, None)


def served_routes(choice: dict) -> np.ndarray:
    """The choice's `routed_experts`, decoded as a vLLM client does."""
    encoded = choice.get("routed_experts")
    assert encoded, f"no routed_experts in the choice: {sorted(choice)}"
    return decode_routed_experts(encoded)


def same_experts(served: np.ndarray, reference: np.ndarray) -> bool:
    """Equal sets of experts per token and layer (the order of near-equal logits may differ)."""
    return served.shape == reference.shape and bool(
        (np.sort(served.astype(np.int64), axis=-1) == np.sort(reference.astype(np.int64), axis=-1)).all()
    )
