"""Typed JSON of the Badit HTTP routes (`GET /v1/badit/experts`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from badit_serve.core.format import STRICT, RoutingTable
from badit_serve.core.routing import RouterMode


class ExpertCounts(BaseModel):
    """Live counts of one expert of one layer."""

    model_config = STRICT

    expert: int = Field(ge=0)
    label: str | None = None
    """Ability label from the routing table (None when not measured)."""
    tokens: int = Field(ge=0)
    """Real tokens that selected this expert since counting started."""
    router_weight_sum: float = Field(ge=0)
    """Sum of this expert's routing weights over those tokens."""


class LayerCounts(BaseModel):
    model_config = STRICT

    module: str
    """Adapted module, e.g. model.layers.0.mlp.gate_proj."""
    layer: str
    """The `layer` label of the prometheus counters."""
    tokens: int = Field(ge=0)
    """Tokens routed through this layer (each selects top_k experts in topk mode)."""
    experts: list[ExpertCounts]


class ExpertsResponse(BaseModel):
    """`GET /v1/badit/experts`: the routing table and the live per-expert counts."""

    model_config = STRICT

    object: Literal["badit.experts"] = "badit.experts"
    model: str
    """The served model name."""
    num_experts: int
    top_k: int
    router: RouterMode
    counting_since: float | None
    """Unix time counting started (after engine start-up, so warm-up is excluded)."""
    layers: list[LayerCounts]
    routing_table: RoutingTable
