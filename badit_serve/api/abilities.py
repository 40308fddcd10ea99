"""Per-request routing at the API: steering controls checked at the edge, and the `badit_abilities` summary.

`RequestRouting` is an ASGI middleware inside `RequestGate` (which has already bounded the body). For an
OpenAI completion or chat request whose `vllm_xargs` carries Badit's controls (`core.steering`) it answers
400 naming the field when a value is malformed or out of range for the served routing (vLLM would pass any
`vllm_xargs` through to the engine), and when the request asks for `badit_abilities` it adds to every
choice of the (non-streaming) answer a summary of the choice's `routed_experts`:

    "badit_abilities": {"routed_tokens": N, "layers": L, "experts_per_token": W,
                        "experts": [{"expert": e, "label": "...", "tokens": c_e, "share": c_e / (N*L*W)}]}

c_e counts the (token, layer, slot) entries of `routed_experts` equal to e, so the counts add up to
N × L × W (tokens routed through no expert, NO_EXPERT, are left out of the counts and named apart).
The worker's geometry comes from `BaditWorkerExtension.badit_start_request_routing` at server start.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import numpy as np
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from badit_serve.api.limits import Violation, error_response, request_json
from badit_serve.core.steering import KEYS, SteeringError, SteeringSpec, parse_steering

ROUTED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/invocations"})
"""Routes whose body is an OpenAI completion or chat request (vLLM's `vllm_xargs`)."""
XARGS = "vllm_xargs"


@dataclass(frozen=True)
class ServedRouting:
    """What the server's routed layers offer per request (from the worker at start)."""

    spec: SteeringSpec
    returns_routed_experts: bool
    labels: Callable[[str], Mapping[str, str]]
    """Served model name -> expert label by index (str), from its routing table."""


def routing_request_violation(body: Any, routing: ServedRouting | None) -> Violation | None:
    """Why a request's Badit controls cannot run (400 naming the field), or None."""
    if not isinstance(body, dict):
        return None
    extra = body.get(XARGS)
    if not isinstance(extra, dict) or not any(k in extra for k in KEYS):
        return None
    bad = HTTPStatus.BAD_REQUEST
    if routing is None:
        return Violation(bad, XARGS, "this server has no routed layers to steer or report")
    try:
        steering = parse_steering(extra, routing.spec, XARGS)
    except SteeringError as exc:
        return Violation(bad, exc.field, exc.message)
    if steering.abilities and not routing.returns_routed_experts:
        return Violation(
            bad,
            f"{XARGS}.badit_abilities",
            "the server does not return routed experts: start it with badit-serve --return-routed-experts",
        )
    if steering.abilities and body.get("stream"):
        return Violation(bad, f"{XARGS}.badit_abilities", "needs a non-streaming request (stream: false)")
    return None


def decode_routed_experts(encoded: str) -> np.ndarray:
    """vLLM's `routed_experts`: base64 of a `.npy` array (tokens - 1, layers, experts per token)."""
    routes: np.ndarray = np.load(io.BytesIO(base64.b64decode(encoded)), allow_pickle=False)
    return routes


def abilities_summary(routes: np.ndarray, labels: Mapping[str, str], num_experts: int) -> dict[str, Any]:
    """The per-expert summary of one choice's routed experts (see the module docstring)."""
    tokens, layers, width = routes.shape
    flat = routes.reshape(-1).astype(np.int64)
    counted = flat[flat < num_experts]
    counts = np.bincount(counted, minlength=num_experts)
    total = tokens * layers * width
    return {
        "routed_tokens": int(tokens),
        "layers": int(layers),
        "experts_per_token": int(width),
        "unrouted_entries": int(flat.size - counted.size),
        "experts": [
            {
                "expert": e,
                "label": labels.get(str(e)),
                "tokens": int(c),
                "share": float(c) / total if total else 0.0,
            }
            for e, c in enumerate(counts.tolist())
        ],
    }


def add_abilities(payload: dict[str, Any], routing: ServedRouting) -> dict[str, Any]:
    """Add `badit_abilities` to every choice of an answer that has `routed_experts`."""
    labels = routing.labels(str(payload.get("model", "")))
    for choice in payload.get("choices") or []:
        encoded = choice.get("routed_experts") if isinstance(choice, dict) else None
        if encoded:
            routes = decode_routed_experts(encoded)
            choice["badit_abilities"] = abilities_summary(routes, labels, routing.spec.num_experts)
    return payload


class RequestRouting:
    """Pure ASGI middleware inside `RequestGate` (which decodes the body once, `request_json`): 400 for bad
    Badit controls, `badit_abilities` added to answers that ask."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = (
            scope.get("path", "").removeprefix(scope.get("root_path", "")) if scope["type"] == "http" else ""
        )
        if path not in ROUTED_PATHS or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        decoded = request_json(scope)
        routing: ServedRouting | None = getattr(scope["app"].state, "badit_routing", None)
        violation = routing_request_violation(decoded, routing)
        if violation is not None:
            return await error_response(violation)(scope, receive, send)
        asks = isinstance(decoded, dict) and (decoded.get(XARGS) or {}).get("badit_abilities")
        if asks and routing is not None:
            send = _summarising(send, routing)
        await self.app(scope, receive, send)


def _summarising(send: Send, routing: ServedRouting) -> Send:
    """A `send` that holds a 200 JSON answer until its last body part and adds the summaries to it."""
    start: Message | None = None
    parts: list[bytes] = []

    async def send_summarised(message: Message) -> None:
        nonlocal start
        if message["type"] == "http.response.start" and message["status"] == 200:
            start = message
            return
        if start is None or message["type"] != "http.response.body":
            await send(message)
            return
        parts.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        body = b"".join(parts)
        try:
            body = json.dumps(add_abilities(json.loads(body), routing)).encode()
        except (ValueError, TypeError):
            pass  # not the JSON answer expected: passed on as it came
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    return send_summarised
