"""Per-request routing controls: which experts a request may use and how its router is biased.

A request carries them in vLLM's extension field (`vllm_xargs` in the OpenAI body, `extra_args` of
`SamplingParams`), so they travel with the request to the model without a new API:

    "vllm_xargs": {"badit_mask": [5], "badit_bias": [0, 0, 1.5, 0, 0, 0, 0, 0], "badit_abilities": true}

- `badit_mask`: expert indices that are never selected for this request (router logit -inf);
- `badit_bias`: one number per expert, added to the router logits (float32) before top-k;
- `badit_abilities`: return the per-expert summary of the request's routing (`badit_abilities` in the
  choice; the server must return routed experts, see docs/SERVING.md).

Top-k is taken after the change, so a masked expert is replaced by the next best one and the routing
weights (softmax over the selected logits) follow the biased logits. A request without controls routes
exactly as before: the served layers add a zero row (x + 0.0 == x in float32).

Validation is the same at the edge (the API server answers 400 naming the field) and in the reference
loader; `SteeringSpec` is what it needs to know of the served routing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from badit_serve.core.routing import RouterMode

MASK_KEY = "badit_mask"
BIAS_KEY = "badit_bias"
ABILITIES_KEY = "badit_abilities"
KEYS = (MASK_KEY, BIAS_KEY, ABILITIES_KEY)
MAX_ABS_BIAS = 1e4
"""Bias values beyond this are refused: a mask says "never"; a finite bias keeps the softmax finite."""


class SteeringError(ValueError):
    """A malformed routing control; `field` names it as the client wrote it (e.g. `vllm_xargs.badit_mask`)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class SteeringSpec:
    """What validation needs of the served routing: experts per layer, experts each token uses, the mode."""

    num_experts: int
    top_k: int
    mode: RouterMode

    @classmethod
    def of(cls, routing: Any) -> SteeringSpec:
        """From anything that names the routing as an export's `badit` block does (`BaditBlock`,
        `SlotGeometry`): num_experts, top_k, router."""
        return cls(routing.num_experts, routing.top_k, routing.router)

    @property
    def width(self) -> int:
        """Experts each token is routed to per layer: top_k, all K for 'dense', the single one for 'none'."""
        return {"topk": self.top_k, "dense": self.num_experts, "none": 1}[self.mode]


@dataclass(frozen=True)
class Steering:
    """One request's validated controls."""

    bias: tuple[float, ...] | None = None
    """(K,) added to the router logits: the bias, with -inf on masked experts; None: no change."""
    abilities: bool = False
    """The request asks for the `badit_abilities` summary."""


def _field(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _index_list(value: Any, field: str, num_experts: int) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise SteeringError(field, f"must be a list of expert indices (integers), got {value!r}")
    bad = [v for v in value if not 0 <= v < num_experts]
    if bad:
        raise SteeringError(
            field, f"expert(s) {bad} out of range: this model has experts 0..{num_experts - 1}"
        )
    return value


def _bias_list(value: Any, field: str, num_experts: int) -> list[float]:
    numbers = isinstance(value, list) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    )
    if not numbers:
        raise SteeringError(field, f"must be a list of {num_experts} numbers (one per expert), got {value!r}")
    if len(value) != num_experts:
        raise SteeringError(field, f"has {len(value)} values; this model has {num_experts} experts per layer")
    bad = [v for v in value if not math.isfinite(v) or abs(v) > MAX_ABS_BIAS]
    if bad:
        raise SteeringError(
            field, f"values must be finite and within ±{MAX_ABS_BIAS:g} (use badit_mask to exclude)"
        )
    return [float(v) for v in value]


def parse_steering(extra: Mapping[str, Any] | None, spec: SteeringSpec, prefix: str = "") -> Steering:
    """The controls in a request's extension dict (`vllm_xargs` / `extra_args`); other keys are ignored.
    Raises SteeringError naming the field (`prefix`.key)."""
    if not extra:
        return Steering()
    mask = extra.get(MASK_KEY)
    bias = extra.get(BIAS_KEY)
    abilities = extra.get(ABILITIES_KEY, False)
    if abilities not in (True, False, 0, 1):
        raise SteeringError(_field(prefix, ABILITIES_KEY), f"must be true or false, got {abilities!r}")
    if mask is None and bias is None:
        return Steering(abilities=bool(abilities))
    if spec.mode == "none":
        field = _field(prefix, MASK_KEY if mask is not None else BIAS_KEY)
        raise SteeringError(
            field, "this model's routed layers have one expert and no router: nothing to steer"
        )
    values = [0.0] * spec.num_experts
    if bias is not None:
        values = _bias_list(bias, _field(prefix, BIAS_KEY), spec.num_experts)
    if mask is not None:
        masked = set(_index_list(mask, _field(prefix, MASK_KEY), spec.num_experts))
        left = spec.num_experts - len(masked)
        if left < spec.width if spec.mode == "topk" else left < 1:
            raise SteeringError(
                _field(prefix, MASK_KEY),
                f"masks {len(masked)} of {spec.num_experts} experts; at least "
                f"{spec.width if spec.mode == 'topk' else 1} must stay selectable (top_k = {spec.top_k})",
            )
        values = [-math.inf if e in masked else v for e, v in enumerate(values)]
    return Steering(bias=tuple(values), abilities=bool(abilities))
