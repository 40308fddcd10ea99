"""The demo scripts' helpers around one badit-serve process: a free loopback port, a started server with its
log, waiting for /health (with the log tail on failure), and a clean stop (no process left behind)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path


class ServerError(RuntimeError):
    """badit-serve exited or did not become healthy; the message carries its log tail."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    command: list[str], cwd: Path, log_path: Path, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """Start badit-serve in its own process group (so `stop_server` can end all of it), output to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        return subprocess.Popen(
            command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def log_tail(log_path: Path, lines: int = 40) -> str:
    return "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-lines:])


def wait_healthy(base: str, proc: subprocess.Popen, log_path: Path, timeout: float = 600) -> None:
    """Poll `base`/health until 200; a `ServerError` with the log tail if the server exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerError(f"badit-serve exited with code {proc.returncode}:\n{log_tail(log_path)}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise ServerError(f"badit-serve not healthy after {timeout:.0f} s:\n{log_tail(log_path)}")


def stop_server(proc: subprocess.Popen, timeout: float = 60) -> None:
    """SIGINT (vLLM shuts its engine down), then SIGKILL what is left of the server's own process group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    try:  # the group started for this server only: whatever of it is still alive (engine workers)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # nothing left
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while group_alive(proc.pid):
        if time.monotonic() > deadline:
            raise ServerError(f"processes of badit-serve's group {proc.pid} still alive 30 s after SIGKILL")
        time.sleep(0.2)


def group_alive(pgid: int) -> bool:
    """Whether any process of the group is left."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
