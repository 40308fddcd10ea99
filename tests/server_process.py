"""A badit-serve process started by a test: a free port, waiting for /health, stopping it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, url: str, timeout_s: float, log_tail: Callable[[], str]) -> None:
    """Poll `url`/health until 200; fail the test with the server's log tail if it exits or times out."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            pytest.fail(f"badit-serve exited with {proc.returncode}:\n{log_tail()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"badit-serve not healthy after {timeout_s}s:\n{log_tail()}")
        time.sleep(1)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server (it shuts its engine down), then SIGKILL its own process group if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the group started for this server only
            proc.wait(timeout=30)


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
