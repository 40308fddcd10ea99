"""badit-serve started by a serving test (one command line for every fixture), and a streaming chat client.

Starting, health polling and stopping are `badit_serve.launch.server_process`; a `ServerError` becomes a
`pytest.fail` carrying the server's log tail, without a traceback through the helper."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from badit_serve.launch.server_process import ServerError, ServerProcess, free_port, start_server

BADIT_SERVE = str(Path(sys.executable).with_name("badit-serve"))
STARTUP_TIMEOUT_S = 300
MAX_MODEL_LEN = 512
API_KEY = "sk-badit-test"
MODEL = "badit-tiny"
"""The served model name of a single-export test server."""


@dataclass(frozen=True)
class ServeOptions:
    """What a serving test chooses of `badit-serve MODEL`'s command line."""

    api_key: str = API_KEY
    served_model_name: str = MODEL
    max_model_len: int = MAX_MODEL_LEN
    extra: tuple[str, ...] = ()
    """Further options, e.g. ("--dtype", "float32") or adapters."""

    def command(self, model: Path, port: int) -> list[str]:
        """The command line: loopback port, API key, prefix caching off (every prompt token is routed, so
        the expert counters are exact), then `extra`."""
        return [
            BADIT_SERVE,
            str(model),
            "--port",
            str(port),
            "--api-key",
            self.api_key,
            "--served-model-name",
            self.served_model_name,
            "--max-model-len",
            str(self.max_model_len),
            "--no-enable-prefix-caching",
            *self.extra,
        ]


def launch_badit_serve(model: Path, root: Path, options: ServeOptions) -> ServerProcess:
    """Start `options.command` on a free port with a 1 GiB KV cache, log `root`/server.log; not waited for.

    The working directory is `root`, outside the repository: the repo root's badit.egg-info must not
    shadow the installed entry points. The test process's PROMETHEUS_MULTIPROC_DIR is not passed on
    (badit-serve makes a fresh one of its own)."""
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log = root / "server.log"
    return start_server(
        options.command(model, port), port=port, log=log, cwd=root, env=env, name="badit-serve"
    )


def wait_healthy_or_fail(server: ServerProcess, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    """`server.wait_healthy`; if it is not healthy, stop it (nothing left running) and fail the test with
    the server's log tail rather than a traceback through the helper."""
    try:
        server.wait_healthy(timeout_s)
    except ServerError as exc:
        server.stop()
        pytest.fail(str(exc), pytrace=False)


@dataclass
class StreamResult:
    """One streaming chat request as its client saw it."""

    status: int
    """The HTTP status; 0 when no response started (e.g. connection refused)."""
    done: bool = False
    """The stream ended with `data: [DONE]`."""
    finish_reason: str | None = None
    usage: dict | None = None
    retry_after: str | None = None
    error: str | None = None
    """An error event inside the stream (`event: ...`), the body of a non-200 answer, or a transport
    error."""
    events: int = 0
    """`data:` events received, [DONE] included."""


async def stream_chat(
    client: httpx.AsyncClient,
    url: str,
    body: dict,
    headers: dict[str, str],
    result: StreamResult | None = None,
) -> StreamResult:
    """POST a streaming chat request to `url`/v1/chat/completions and read it to its end.

    Every `data:` event must be JSON or `[DONE]` (a torn event raises). A transport error after the
    status line keeps that status with done=False: a truncated stream, unlike a refused connection.
    `result`, when given, is filled as the stream arrives (for a caller watching its progress)."""
    result = StreamResult(0) if result is None else result
    try:
        async with client.stream(
            "POST", f"{url}/v1/chat/completions", json=body, headers=headers
        ) as response:
            result.status, result.retry_after = response.status_code, response.headers.get("retry-after")
            if response.status_code != 200:
                result.error = f"{response.status_code}: {(await response.aread()).decode(errors='replace')}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                result.events += 1
                if line == "data: [DONE]":
                    result.done = True
                    continue
                assert not result.done, f"an event after [DONE]: {line!r}"
                chunk = json.loads(line[len("data: ") :])
                if "error" in chunk:  # vLLM reports a failure after the 200 status line as an event
                    result.error = f"event: {chunk['error'].get('message')}"
                if chunk.get("choices") and chunk["choices"][0].get("finish_reason"):
                    result.finish_reason = chunk["choices"][0]["finish_reason"]
                result.usage = chunk.get("usage") or result.usage
    except httpx.TransportError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


def greedy_completion(
    url: str, model: str, prompt: list[int], max_tokens: int, api_key: str = API_KEY, **extra: object
) -> httpx.Response:
    """POST /v1/completions for the token ids `prompt`: greedy, exactly `max_tokens` tokens (ignore_eos), the
    generated token ids returned (`return_token_ids`); `extra` fields (logprobs, vllm_xargs, stream) added."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "return_token_ids": True,
        **extra,
    }
    headers = {"Authorization": f"Bearer {api_key}"}
    return httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=300)
