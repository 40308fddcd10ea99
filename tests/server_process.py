"""A badit-serve process started by a test: a free port, waiting for /health, stopping it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable

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
