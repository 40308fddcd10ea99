"""RequestGate (badit_serve/api/limits.py) on a small ASGI app: key, body size, field limits, roles, Retry-After.

The same gate runs in front of the real server in tests/test_serve.py; these cases run in milliseconds.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from badit_serve.api.limits import ENV_LIMITS, RequestGate, RequestLimits, check_body, replay

KEY = "sk-gate"
LIMITS = RequestLimits(max_body_bytes=2000, max_sequences=4, max_tokens=64, max_messages=3, retry_after_s=7)
AUTH = {"Authorization": f"Bearer {KEY}"}


async def echo(request: Request) -> JSONResponse:
    body = await request.body()
    try:
        decoded = json.loads(body)
    except ValueError:
        decoded = None
    return JSONResponse({"bytes": len(body), "json": decoded})


async def busy(request: Request) -> Response:
    return JSONResponse({"error": "queue full"}, status_code=503)


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    routes = [
        Route(path, echo, methods=["GET", "POST"])
        for path in ("/v1/chat/completions", "/invocations", "/health", "/tokenize")
    ]
    app = Starlette(routes=[*routes, Route("/v1/busy", busy, methods=["POST"])])
    app.add_middleware(RequestGate, limits=LIMITS, api_keys=[KEY])
    with TestClient(app) as test_client:
        yield test_client


def _chat(**fields: object) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}


def test_a_request_within_the_limits_reaches_the_route_with_its_body_intact(client: TestClient) -> None:
    body = _chat(n=2, max_tokens=64, max_completion_tokens=10)
    response = client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert response.status_code == 200 and response.json()["json"] == body


@pytest.mark.parametrize(
    ("fields", "param", "flag"),
    [
        ({"n": 10000}, "n", "--max-n"),
        ({"n": 2, "prompt": ["a", "b", "c"]}, "n", "--max-n"),  # 6 sequences
        ({"max_tokens": 65}, "max_tokens", "--max-tokens"),
        ({"max_completion_tokens": 10**9}, "max_completion_tokens", "--max-tokens"),
        ({"messages": [{"role": "user", "content": "x"}] * 4}, "messages", "--max-messages"),
    ],
)
def test_over_limit_requests_get_400_naming_the_limit(
    client: TestClient, fields: dict, param: str, flag: str
) -> None:
    response = client.post("/v1/chat/completions", json=_chat(**fields), headers=AUTH)
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == param and flag in error["message"]
    assert error["type"] == "BadRequestError" and error["code"] == 400


def test_an_unknown_role_gets_400(client: TestClient) -> None:
    messages = [{"role": "user", "content": "x"}, {"role": "wizard", "content": "abracadabra"}]
    response = client.post("/v1/chat/completions", json=_chat(messages=messages), headers=AUTH)
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages[1].role"
    assert "'wizard' is not a known role" in response.json()["error"]["message"]


def test_a_body_over_the_size_limit_gets_413_declared_or_chunked(client: TestClient) -> None:
    big = json.dumps(_chat(pad="x" * 3000)).encode()
    response = client.post("/v1/chat/completions", content=big, headers=AUTH)
    assert response.status_code == 413 and "--max-body-bytes" in response.json()["error"]["message"]
    chunked = client.post("/v1/chat/completions", content=iter([big[:1500], big[1500:]]), headers=AUTH)
    assert chunked.status_code == 413
    small = client.post("/v1/chat/completions", content=iter([b'{"a":', b" 1}"]), headers=AUTH)
    assert small.status_code == 200 and small.json()["json"] == {"a": 1}


def test_non_json_and_odd_types_are_left_to_vllm(client: TestClient) -> None:
    assert client.post("/v1/chat/completions", content=b"{not json", headers=AUTH).json()["bytes"] == 9
    assert client.post("/v1/chat/completions", json=_chat(n="many"), headers=AUTH).status_code == 200
    assert check_body([1, 2], LIMITS) is None and check_body({"prompt": [1, 2, 3], "n": 4}, LIMITS) is None


def test_the_key_guards_every_route_but_the_open_ones(client: TestClient) -> None:
    for path in ("/invocations", "/tokenize", "/v1/chat/completions"):
        assert client.post(path, json=_chat()).status_code == 401
        assert client.post(path, json=_chat(), headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.post(path, json=_chat(), headers=AUTH).status_code == 200
    assert client.get("/health").status_code == 200
    assert client.post("/invocations", json=_chat(n=99), headers=AUTH).status_code == 400  # limits too


def test_busy_answers_carry_retry_after(client: TestClient) -> None:
    response = client.post("/v1/busy", json={}, headers=AUTH)
    assert response.status_code == 503 and response.headers["retry-after"] == "7"


def test_without_a_key_only_the_limits_apply() -> None:
    app = Starlette(routes=[Route("/invocations", echo, methods=["POST"])])
    app.add_middleware(RequestGate, limits=LIMITS, api_keys=[])
    with TestClient(app) as open_client:
        assert open_client.post("/invocations", json=_chat()).status_code == 200
        assert open_client.post("/invocations", json=_chat(max_tokens=100)).status_code == 400


def test_replay_gives_the_body_once_then_the_clients_own_messages() -> None:
    async def client_receive() -> dict:
        return {"type": "http.disconnect"}

    async def run() -> list[dict]:
        receive = replay(b"abc", client_receive)
        return [await receive(), await receive()]

    first, second = asyncio.run(run())
    assert first == {"type": "http.request", "body": b"abc", "more_body": False}
    assert second == {"type": "http.disconnect"}


def test_limits_travel_through_the_environment_and_reject_nonsense() -> None:
    assert RequestLimits.from_env({ENV_LIMITS: LIMITS.model_dump_json()}) == LIMITS
    assert RequestLimits.from_env({}) == RequestLimits()
    with pytest.raises(ValueError, match="max_tokens"):
        RequestLimits(max_tokens=0)


def test_inference_requests_beyond_max_in_flight_get_503_before_the_route_runs() -> None:
    release, entered = asyncio.Event(), []

    async def slow(request: Request) -> JSONResponse:
        entered.append(request.url.path)
        await release.wait()
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route(p, slow, methods=["POST"]) for p in ("/v1/completions", "/tokenize")])
    app.add_middleware(RequestGate, limits=LIMITS.model_copy(update={"max_in_flight": 2}), api_keys=[])

    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gate") as client:
            held = [asyncio.create_task(client.post("/v1/completions", json={})) for _ in range(2)]
            while len(entered) < 2:
                await asyncio.sleep(0.01)
            refused = await client.post("/v1/completions", json={"prompt": "x"})
            other = asyncio.create_task(client.post("/tokenize", json={}))  # not an inference route
            while len(entered) < 3:
                await asyncio.sleep(0.01)
            release.set()
            done = [*(await asyncio.gather(*held, other)), refused]
            return [*done, await client.post("/v1/completions", json={})]

    *held, other, refused, later = asyncio.run(run())
    assert [r.status_code for r in (*held, other, later)] == [200, 200, 200, 200]
    assert refused.status_code == 503 and refused.headers["retry-after"] == "7"
    assert "--max-in-flight" in refused.json()["error"]["message"] and entered.count("/v1/completions") == 3


def test_a_request_stops_counting_once_answered_even_while_its_app_winds_down() -> None:
    """A streaming app may still run after its last body message; the client already has its answer and
    asks again. That request is not in flight any more (it made the load test meet a 503 at 16 clients)."""
    linger = asyncio.Event()
    calls: list[int] = []

    async def app(scope: dict, receive, send) -> None:  # noqa: ANN001
        calls.append(len(calls))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: [DONE]", "more_body": False})
        if len(calls) == 1:
            await linger.wait()  # the first request's app winds down slowly

    gate = RequestGate(app, LIMITS.model_copy(update={"max_in_flight": 1}), api_keys=[])

    async def request() -> list[dict]:
        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}
        sent: list[dict] = []

        async def receive() -> dict:
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message: dict) -> None:
            sent.append(message)

        first = asyncio.create_task(gate(scope, receive, send))
        while not sent or sent[-1].get("more_body", True):  # until the first answer is complete
            await asyncio.sleep(0.01)
        assert not first.done() and gate.in_flight == 0
        second: list[dict] = []
        await gate(scope, receive, lambda m: _append(second, m))
        linger.set()
        await first
        return second

    second = asyncio.run(request())
    assert second[0]["status"] == 200 and gate.in_flight == 0 and len(calls) == 2


async def _append(messages: list[dict], message: dict) -> None:
    messages.append(message)


def test_inference_requests_get_503_with_retry_after_once_the_engine_has_stopped() -> None:
    """After SIGTERM vLLM stops the engine before the HTTP server: requests in between got a 500."""

    class EngineClient:
        errored = False

    app = Starlette(routes=[Route(p, echo, methods=["POST"]) for p in ("/v1/chat/completions", "/tokenize")])
    app.add_middleware(RequestGate, limits=LIMITS, api_keys=[])
    app.state.engine_client = EngineClient()
    with TestClient(app) as test_client:
        assert test_client.post("/v1/chat/completions", json=_chat()).status_code == 200
        app.state.engine_client.errored = True
        response = test_client.post("/v1/chat/completions", json=_chat())
        assert response.status_code == 503 and response.headers["retry-after"] == "7"
        assert "not running" in response.json()["error"]["message"]
        assert test_client.post("/tokenize", json={"prompt": "x"}).status_code == 200  # not inference
