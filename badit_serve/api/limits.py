"""Request limits and the gate in front of vLLM's HTTP routes.

What vLLM 0.32 bounds by itself (badit-serve sets or uses these options):
  - prompt + output tokens per sequence: `--max-model-len` (400 "maximum context length");
  - `n` per request: the VLLM_MAX_N_SEQUENCES environment variable (default 16384; badit-serve sets it to
    --max-n), checked in `SamplingParams` (400);
  - a request without `max_tokens` gets `max_model_len - prompt`; `--override-generation-config
    '{"max_new_tokens": N}'` lowers that default and silently clamps larger values (badit-serve sets N to
    --max-tokens);
  - sequences in flight (waiting + running): `--max-num-queued-reqs`, 503 beyond it. Its check before a
    streaming response starts races with concurrent requests: the one in `add_request` then fails the stream
    after a 200 status line (an error event inside the stream, seen on CPU with 48 concurrent streams);
  - HTTP header abuse: `--h11-max-incomplete-event-size`, `--h11-max-header-count`;
  - the bearer key (`--api-key`) only on paths under /v1, /v2, /inference and /cohere.

What `RequestGate` (an ASGI middleware installed by the endpoint plugin, inside vLLM's key check) adds:
  - the key on every other route except the open ones (`OPEN_PATHS`: /health, /metrics, ...). vLLM leaves
    `/invocations` (the same inference as /v1) and `/tokenize` open;
  - 413 for a body over `max_body_bytes` (Content-Length, or counted while reading a chunked body);
  - 400 naming the limit for a JSON body over `max_sequences` (n × prompts), `max_tokens` (max_tokens,
    max_completion_tokens, max_output_tokens) or `max_messages`, and for a message role outside `ROLES`
    (vLLM accepts any string as a "custom" role);
  - 503 + Retry-After before the route runs once `max_in_flight` inference requests (waiting or running,
    streams until their last byte) are in progress in this API server: counted in its single event loop, so
    it has no such race and a refused stream never starts. badit-serve sets vLLM's --max-num-queued-reqs to
    max_in_flight × max_sequences, a backstop for routes the gate does not count;
  - 503 + Retry-After for an inference request once the engine has stopped (`engine_client.errored`):
    after SIGTERM / SIGINT vLLM kills the engine first and stops the HTTP server a moment later; requests
    arriving in between got a 500 "EngineCore encountered an issue". (One already past the gate when the
    engine stops can still get that 500.)
  - `Retry-After` on every 429/503 answer (vLLM's queue-full 503 has none).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

ENV_LIMITS = "BADIT_REQUEST_LIMITS"  # RequestLimits as JSON, written by badit-serve, read by the plugin
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
OPEN_PATHS = frozenset(
    {"/health", "/metrics", "/ping", "/version", "/load", "/openapi.json", "/docs", "/redoc"}
)
TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
INFERENCE_PATHS = frozenset(  # the routes that put work on the engine (counted against max_in_flight)
    {
        "/v1/chat/completions",
        "/v1/chat/completions/batch",
        "/v1/completions",
        "/v1/responses",
        "/v1/messages",
        "/invocations",
        "/generative_scoring",
        "/inference/v1/generate",
    }
)
REQUEST_JSON = "badit.request_json"
"""Scope key under which `RequestGate` leaves the decoded JSON body for the middleware inside it."""
RETRY_STATUSES = frozenset({HTTPStatus.TOO_MANY_REQUESTS, HTTPStatus.SERVICE_UNAVAILABLE})


class RequestLimits(BaseModel):
    """Per-request bounds of badit-serve (the defaults protect a small machine; raise them with the flags)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    max_body_bytes: int = Field(default=1 << 20, ge=1)
    """--max-body-bytes: largest request body; more gets 413."""
    max_sequences: int = Field(default=8, ge=1)
    """--max-n: most sequences one request may generate, n × number of prompts."""
    max_tokens: int = Field(default=1024, ge=1)
    """--max-tokens: largest max_tokens / max_completion_tokens / max_output_tokens."""
    max_messages: int = Field(default=128, ge=1)
    """--max-messages: most chat messages (or input items) in one request."""
    max_in_flight: int = Field(default=64, ge=1)
    """--max-in-flight: inference requests in progress (waiting or running); more get 503."""
    retry_after_s: int = Field(default=5, ge=1)
    """--retry-after: seconds sent in Retry-After with every 429/503."""

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> RequestLimits:
        text = env.get(ENV_LIMITS)
        return cls.model_validate_json(text) if text else cls()


@dataclass(frozen=True)
class Violation:
    """Why a request is refused: the HTTP status, the offending field, and a message naming the limit."""

    status: HTTPStatus
    param: str | None
    message: str


def error_response(violation: Violation, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """The OpenAI error body vLLM also sends: {"error": {"message", "type", "param", "code"}}."""
    kind = "BadRequestError" if violation.status == HTTPStatus.BAD_REQUEST else violation.status.phrase
    body = {"message": violation.message, "type": kind, "param": violation.param, "code": violation.status}
    return JSONResponse({"error": body}, status_code=violation.status, headers=dict(headers or {}))


def _count(value: Any) -> int | None:
    """An int field's value (bools and other types are left to vLLM's own validation)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _num_prompts(prompt: Any) -> int:
    """`prompt` of /v1/completions: a string or a token list is one prompt, a list of those is several."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        return len(prompt)
    return 1


def _roles(body: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    """(field, role) of every chat message and every role-carrying input item."""
    for field in ("messages", "input"):
        items = body.get(field)
        if isinstance(items, list):
            for i, item in enumerate(items):
                if isinstance(item, dict) and "role" in item:
                    yield f"{field}[{i}].role", item["role"]


def check_body(body: Any, limits: RequestLimits) -> Violation | None:
    """The first limit a decoded JSON request body breaks, or None."""
    if not isinstance(body, dict):
        return None
    bad = HTTPStatus.BAD_REQUEST
    n = _count(body.get("n")) or 1
    sequences = n * _num_prompts(body.get("prompt"))
    if sequences > limits.max_sequences:
        return Violation(
            bad,
            "n",
            f"this request asks for {sequences} sequences (n × prompts); the server allows at most "
            f"{limits.max_sequences} per request (badit-serve --max-n)",
        )
    for field in TOKEN_FIELDS:
        tokens = _count(body.get(field))
        if tokens is not None and tokens > limits.max_tokens:
            return Violation(
                bad,
                field,
                f"{field}={tokens} is over the server's limit of {limits.max_tokens} (badit-serve --max-tokens)",
            )
    for field in ("messages", "input"):
        items = body.get(field)
        if isinstance(items, list) and len(items) > limits.max_messages:
            return Violation(
                bad,
                field,
                f"{field} has {len(items)} entries; the server allows at most {limits.max_messages} "
                "(badit-serve --max-messages)",
            )
    for field, role in _roles(body):
        if role not in ROLES:
            return Violation(
                bad, field, f"{field} {role!r} is not a known role (one of {', '.join(sorted(ROLES))})"
            )
    return None


def _unavailable(limits: RequestLimits, why: str) -> Violation:
    """503 (sent with Retry-After) saying why and when to retry."""
    return Violation(HTTPStatus.SERVICE_UNAVAILABLE, None, f"{why}; retry after {limits.retry_after_s} s")


def _busy(limits: RequestLimits) -> Violation:
    return _unavailable(
        limits,
        f"the server is busy: {limits.max_in_flight} requests are in progress, its limit "
        "(badit-serve --max-in-flight)",
    )


def _stopped(limits: RequestLimits) -> Violation:
    return _unavailable(limits, "the engine is not running (the server is shutting down, or it failed)")


def engine_stopped(scope: Scope) -> bool:
    """Whether vLLM's engine client (app.state.engine_client, set once the engine runs) has stopped."""
    engine = getattr(getattr(scope.get("app"), "state", None), "engine_client", None)
    return bool(engine is not None and engine.errored)


def _too_large(limits: RequestLimits) -> Violation:
    return Violation(
        HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
        None,
        f"the request body is over the server's limit of {limits.max_body_bytes} bytes "
        "(badit-serve --max-body-bytes)",
    )


async def read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body, or None as soon as it grows past `limit` bytes."""
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] != "http.request":  # the client went away
            return b""
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks)


def request_json(scope: Scope) -> Any:
    """The request's JSON body as `RequestGate` decoded it (None: no body, not JSON, or no gate outside)."""
    return scope.get(REQUEST_JSON)


def replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives the buffered body once, then the client's own messages (disconnect)."""
    sent = False

    async def receive_again() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive_again


class RequestGate:
    """Pure ASGI middleware: key on non-open routes, body and field limits, Retry-After on 429/503."""

    def __init__(self, app: ASGIApp, limits: RequestLimits, api_keys: list[str]) -> None:
        from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

        self.app = app
        self.limits = limits
        self.in_flight = 0
        """Inference requests now inside the app (one event loop: no lock needed)."""
        self.auth = AuthenticationMiddleware(app, api_keys) if api_keys else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") == "OPTIONS":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        if self.auth and path not in OPEN_PATHS and not self.auth.verify_token(headers):
            return await JSONResponse({"error": "Unauthorized"}, status_code=401)(scope, receive, send)
        send = self._with_retry_after(send)
        if scope["method"] not in BODY_METHODS:
            return await self.app(scope, receive, send)
        violation, body = await self._check(headers, receive, scope)
        if violation is None and path in INFERENCE_PATHS:
            violation = self._unavailable(scope)
        if violation is not None:
            return await error_response(violation)(scope, receive, send)
        if path not in INFERENCE_PATHS:
            return await self.app(scope, replay(body, receive), send)
        await self._counted(scope, replay(body, receive), send)

    async def _counted(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run an inference request, counted in `in_flight` until its response's last body message is
        handed to the server, or until the app returns without one (an error or a client gone). Not until
        the app returns: a streaming app still winds down after its last bytes, and a client that has its
        whole answer may already be asking again (16 streaming clients once met a 503 at 24 in flight)."""
        answered = False

        async def send_counted(message: Message) -> None:
            nonlocal answered
            final = message["type"] == "http.response.body" and not message.get("more_body", False)
            if final and not answered:
                answered = True
                self.in_flight -= 1  # before the last bytes leave: the client cannot ask again first
            await send(message)

        self.in_flight += 1
        try:
            await self.app(scope, receive, send_counted)
        finally:
            if not answered:
                self.in_flight -= 1

    def _unavailable(self, scope: Scope) -> Violation | None:
        if self.in_flight >= self.limits.max_in_flight:
            return _busy(self.limits)
        return _stopped(self.limits) if engine_stopped(scope) else None

    async def _check(
        self, headers: Headers, receive: Receive, scope: Scope
    ) -> tuple[Violation | None, bytes]:
        """The first limit the request breaks (or None) and its body; a JSON body's decoded value is left
        in the scope for the middleware inside (`request_json`), so it is parsed once."""
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.limits.max_body_bytes:
            return _too_large(self.limits), b""
        body = await read_body(receive, self.limits.max_body_bytes)
        if body is None:
            return _too_large(self.limits), b""
        try:
            decoded = json.loads(body) if body else None
        except ValueError:  # not JSON: vLLM answers it
            return None, body
        scope[REQUEST_JSON] = decoded
        return check_body(decoded, self.limits), body

    def _with_retry_after(self, send: Send) -> Send:
        retry_after = str(self.limits.retry_after_s).encode()

        async def send_with_retry_after(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] in RETRY_STATUSES:
                headers = list(message.get("headers", []))
                if not any(name.lower() == b"retry-after" for name, _ in headers):
                    message = {**message, "headers": [*headers, (b"retry-after", retry_after)]}
            await send(message)

        return send_with_retry_after


def api_keys(args: Any, env: Mapping[str, str] = os.environ) -> list[str]:
    """The keys vLLM's own middleware checks: --api-key, else VLLM_API_KEY (vllm/.../middleware/register.py)."""
    return [key for key in (getattr(args, "api_key", None) or [env.get("VLLM_API_KEY")]) if key]
