"""badit-serve end to end: one server (a subprocess, compiled mode) on a tiny labelled llama export.

OpenAI client calls (chat, streaming chat, completion, model list), API-key enforcement, malformed and
over-long requests, and the per-expert counters: with prefix caching off every request adds exactly
top_k * (prompt tokens + generated tokens - 1) selections to each layer (the last generated token is
never fed back), counted on the real tokens only and never during warm-up; in the default bfloat16 and in
float32 (a second server for that one test).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from badit_serve.core.export_io import load_export
from badit_serve.launch.server_process import ServerProcess
from tests.support.badit_exports import make_export
from tests.support.badit_server import (
    API_KEY,
    MAX_MODEL_LEN,
    MODEL,
    ServeOptions,
    StreamResult,
    launch_badit_serve,
    stream_chat,
    wait_healthy_or_fail,
)

pytestmark = [pytest.mark.slow, pytest.mark.serve]

MAX_IN_FLIGHT = 24  # badit-serve --max-in-flight: above the load test's 16 streams, below the overload's 48


@dataclass
class Server:
    url: str
    export: Path
    top_k: int
    expert_labels: dict[str, str]
    process: ServerProcess
    initial_experts: dict | None = None
    """/v1/badit/experts right after start-up, before any request."""

    def client(self, api_key: str = API_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def server(tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """badit-serve in its default dtype (bfloat16)."""
    yield from _serve(tiny_model_dirs, tmp_path_factory, ("--max-in-flight", str(MAX_IN_FLIGHT)))


@pytest.fixture  # one test uses it: stopped before the next starts
def server_float32(
    tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    yield from _serve(tiny_model_dirs, tmp_path_factory, ("--dtype", "float32"))


def _serve(
    tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory, extra: tuple[str, ...]
) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("serve")
    export = make_export(tiny_model_dirs["llama"], root / "export", labelled=True)
    bundle = load_export(export)
    process = launch_badit_serve(export, root, ServeOptions(extra=extra))
    handle = Server(process.url, export, bundle.block.top_k, bundle.routing_table.expert_labels, process)
    try:
        wait_healthy_or_fail(process)
        handle.initial_experts = _experts_json(handle)
        yield handle
    finally:
        process.stop()


def _expert_tokens(server: Server) -> dict[str, dict[str, float]]:
    """layer -> expert -> badit_expert_tokens_total, and "ability" -> "expert|label" -> by-ability total."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    values: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "badit_expert_tokens_total":
                values.setdefault(sample.labels["layer"], {})[sample.labels["expert"]] = sample.value
            elif sample.name == "badit_expert_tokens_by_ability_total":
                key = f"{sample.labels['expert']}|{sample.labels['label']}"
                values.setdefault("ability", {})[key] = sample.value
    return values


def _experts_json(server: Server) -> dict:
    response = httpx.get(
        f"{server.url}/v1/badit/experts", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_warm_up_and_profiling_are_not_counted(server: Server) -> None:
    assert server.initial_experts is not None and server.initial_experts["counting_since"] is not None
    assert all(e["tokens"] == 0 for layer in server.initial_experts["layers"] for e in layer["experts"])


def test_model_list(server: Server) -> None:
    assert [m.id for m in server.client().models.list().data] == [MODEL]


def test_chat_completion(server: Server) -> None:
    response = server.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hi."}], max_tokens=8, temperature=0
    )
    assert isinstance(response.choices[0].message.content, str)
    assert response.usage.completion_tokens <= 8 and response.usage.prompt_tokens > 3


def test_streaming_chat_completion(server: Server) -> None:
    stream = server.client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count."}],
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    assert pieces and usage is not None and usage.completion_tokens == 6


def test_text_completion(server: Server) -> None:
    response = server.client().completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=5, temperature=0
    )
    assert response.choices[0].finish_reason in {"length", "stop"} and response.usage.completion_tokens <= 5


def test_wrong_or_missing_api_key_is_rejected(server: Server) -> None:
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").models.list()
    for path in ("/v1/models", "/v1/badit/experts"):
        assert httpx.get(f"{server.url}{path}", timeout=10).status_code == 401
    assert (
        httpx.post(
            f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "x"}, timeout=10
        ).status_code
        == 401
    )


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server: Server) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    malformed = httpx.post(f"{server.url}/v1/completions", content=b"{not json", headers=headers, timeout=30)
    assert 400 <= malformed.status_code < 500 and malformed.text
    with pytest.raises(openai.BadRequestError, match=r"(?i)context length|too long|maximum"):
        server.client().completions.create(model=MODEL, prompt="word " * (2 * MAX_MODEL_LEN), max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        server.client().completions.create(model=MODEL, prompt="hi", max_tokens=-3)
    with pytest.raises(openai.NotFoundError):
        server.client().completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    response = server.client().completions.create(model=MODEL, prompt="still alive", max_tokens=2)
    assert response.usage.completion_tokens == 2


@pytest.mark.parametrize("fixture", ["server", "server_float32"], ids=["bfloat16", "float32"])
def test_expert_counters_grow_by_top_k_per_routed_token(fixture: str, request: pytest.FixtureRequest) -> None:
    server: Server = request.getfixturevalue(fixture)
    _experts_json(server)  # flush what earlier tests routed, so `before` is exact
    before = _expert_tokens(server)
    assert set(before) >= {"0", "1", "ability"}  # every series exists from the start (at 0 or more)
    client, forwarded = server.client(), 0
    for prompt, max_tokens in [("The cat sat on", 7), ("A", 3), ("Numbers: 1 2 3 4 5 6 7 8 9 10", 11)]:
        usage = client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0
        ).usage
        forwarded += usage.prompt_tokens + usage.completion_tokens - 1
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=4
    )
    forwarded += chat.usage.prompt_tokens + chat.usage.completion_tokens - 1
    expected = server.top_k * forwarded

    experts = _experts_json(server)  # flushes the worker's counters now
    after = _expert_tokens(server)
    for layer in ("0", "1"):
        grown = sum(after[layer].values()) - sum(before.get(layer, {}).values())
        assert grown == expected, f"layer {layer}: {grown} != top_k {server.top_k} x {forwarded} tokens"
    grown_by_ability = sum(after["ability"].values()) - sum(before["ability"].values())
    assert grown_by_ability == 2 * expected  # two layers
    assert {key.split("|")[1] for key in after["ability"]} <= set(server.expert_labels.values()) | {
        "unlabelled"
    }

    assert (
        experts["object"] == "badit.experts"
        and experts["model"] == MODEL
        and experts["top_k"] == server.top_k
    )
    assert [layer["module"] for layer in experts["layers"]] == [
        f"model.layers.{i}.mlp.gate_proj" for i in (0, 1)
    ]
    for layer in experts["layers"]:
        assert sum(e["tokens"] for e in layer["experts"]) == sum(after[layer["layer"]].values())
        assert all(e["router_weight_sum"] >= 0 for e in layer["experts"])
    assert experts["routing_table"]["expert_labels"] == server.expert_labels


# ---- limits, overload, load, fuzz and shutdown (issue 15) -------------------------------------------------

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
LOAD_STREAMS, LOAD_REQUESTS_PER_STREAM = 16, 100


def test_over_limit_and_unknown_role_requests_get_400_and_big_bodies_413(server: Server) -> None:
    url = f"{server.url}/v1/chat/completions"
    hello = [{"role": "user", "content": "hi"}]
    cases = [
        ({"n": 10000}, "--max-n"),
        ({"max_tokens": 10**6}, "--max-tokens"),
        ({"max_completion_tokens": 5000}, "--max-tokens"),
        ({"messages": hello * 500}, "--max-messages"),
    ]
    for fields, flag in cases:
        response = httpx.post(
            url, json={"model": MODEL, "messages": hello, **fields}, headers=HEADERS, timeout=30
        )
        assert response.status_code == 400 and flag in response.json()["error"]["message"], response.text
    wizard = {"model": MODEL, "messages": [{"role": "wizard", "content": "abracadabra"}], "max_tokens": 2}
    response = httpx.post(url, json=wizard, headers=HEADERS, timeout=30)
    assert response.status_code == 400 and "wizard" in response.text
    big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * (2 << 20)}], "max_tokens": 2}
    assert httpx.post(url, json=big, headers=HEADERS, timeout=30).status_code == 413
    # vLLM leaves /invocations (the same inference) outside --api-key; the Badit gate does not.
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    assert httpx.post(f"{server.url}/invocations", json=body, timeout=30).status_code == 401
    assert httpx.post(f"{server.url}/invocations", json=body, headers=HEADERS, timeout=30).status_code == 200
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200  # open
    assert (
        server.client().completions.create(model=MODEL, prompt="ok", max_tokens=2).usage.completion_tokens
        == 2
    )


async def _stream_chat(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> StreamResult:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    return await stream_chat(client, url, body, HEADERS)


async def _run_streams(url: str, streams: int, per_stream: int, max_tokens: int) -> list[StreamResult]:
    """`streams` concurrent clients, each sending `per_stream` streaming chat requests one after another."""
    limits = httpx.Limits(max_connections=streams + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(120), limits=limits) as client:

        async def one_client(c: int) -> list[StreamResult]:
            return [
                await _stream_chat(client, url, f"Client {c} request {i}: count to ten.", max_tokens)
                for i in range(per_stream)
            ]

        per_client = await asyncio.gather(*(one_client(c) for c in range(streams)))
    return [result for results in per_client for result in results]


def test_load_16_concurrent_streams_x_100_requests_no_errors_no_truncation_exact_counters(
    server: Server,
) -> None:
    _experts_json(server)  # flush, so `before` is exact
    before = _expert_tokens(server)
    started = time.monotonic()
    results = asyncio.run(_run_streams(server.url, LOAD_STREAMS, LOAD_REQUESTS_PER_STREAM, max_tokens=4))
    elapsed = time.monotonic() - started
    assert len(results) == LOAD_STREAMS * LOAD_REQUESTS_PER_STREAM
    failed = [r for r in results if r.status != 200 or r.error]
    assert not failed, f"{len(failed)} failed, e.g. {failed[:3]}"
    truncated = [r for r in results if not r.done or r.finish_reason != "length" or r.usage is None]
    assert not truncated, f"{len(truncated)} truncated, e.g. {truncated[:3]}"
    assert all(r.usage["completion_tokens"] == 4 for r in results)
    forwarded = sum(r.usage["prompt_tokens"] + r.usage["completion_tokens"] - 1 for r in results)
    _experts_json(server)
    after = _expert_tokens(server)
    for layer in ("0", "1"):
        grown = sum(after[layer].values()) - sum(before[layer].values())
        assert grown == server.top_k * forwarded, f"layer {layer}: {grown} != {server.top_k} x {forwarded}"
    print(f"load: {len(results)} streams in {elapsed:.1f} s ({len(results) / elapsed:.1f} req/s)")


def test_overload_gets_503_with_retry_after_and_the_rest_complete(server: Server) -> None:
    results = asyncio.run(_run_streams(server.url, 2 * MAX_IN_FLIGHT, 1, max_tokens=200))
    statuses = sorted({r.status for r in results})
    busy = [r for r in results if r.status == 503]
    assert set(statuses) <= {200, 503} and busy, statuses
    assert all(r.retry_after == "5" for r in busy)
    assert all(r.done and r.usage["completion_tokens"] == 200 for r in results if r.status == 200)
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def test_schema_fuzz_of_the_openai_routes_finds_no_server_error(server: Server) -> None:
    """schemathesis against vLLM's own OpenAPI document, bounded in time; then the server still serves."""
    report = server.process.log.with_name("schemathesis.xml")
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "run",
        f"{server.url}/openapi.json",
        "--header",
        f"Authorization: Bearer {API_KEY}",
        "--checks",
        "not_a_server_error",
        "--include-path-regex",
        FUZZ_PATHS,
        "--max-time",
        str(FUZZ_SECONDS),
        "--max-examples",
        "40",
        "--workers",
        "1",  # hypothesis' lambda descriptions hit a CPython 3.11 ast race with several workers
        "--phases",
        "examples,fuzzing",
        "--request-timeout",
        "60",
        "--seed",
        "15",
        "--generation-database",
        "none",
        "--report",
        "junit",
        "--report-junit-path",
        str(report),
        "--no-color",
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=FUZZ_SECONDS + 240, cwd=report.parent
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    assert server.client().completions.create(model=MODEL, prompt="after fuzz", max_tokens=2).usage
    print(done.stdout[-1500:])


FUZZ_PATHS = r"^/v1/(chat/completions|completions|models|badit/experts)$|^/(tokenize|detokenize|invocations)$"
FUZZ_SECONDS = 60
