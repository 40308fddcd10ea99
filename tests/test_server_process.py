"""badit_serve.launch.server_process on trivial servers: a few lines of http.server answering /health, started in
their own process group, then stopped; none starts vLLM.

Each fake server does one thing a real one can: exit 0 on SIGTERM (badit-serve), ignore SIGTERM (a hung
engine: the SIGKILL path), leave a process of its group behind (vLLM's API server without badit-serve's
supervisor), exit before it is healthy (a bad export), or never answer (a start that hangs)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from badit_serve.launch.server_process import (
    ServerError,
    ServerProcess,
    Stopped,
    free_port,
    group_members,
    start_server,
)

FAKE_SERVER = r"""
import http.server, signal, subprocess, sys, time
port, mode = int(sys.argv[1]), sys.argv[2]
print(f"fake server starting: {mode}", flush=True)
if mode == "exits-early":
    print("error: no such export directory", flush=True)
    sys.exit(3)
if mode == "never-healthy":
    time.sleep(60)
if mode == "leaves-a-process":
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    print(f"helper pid {subprocess.Popen([sys.executable, '-c', code]).pid}", flush=True)
signal.signal(signal.SIGTERM, signal.SIG_IGN if mode == "ignores-sigterm" else lambda *_: sys.exit(0))

class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass

time.sleep(0.5)  # not healthy at once: the caller has to poll
http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
"""


def _start(tmp_path: Path, mode: str) -> ServerProcess:
    port = free_port()
    command = [sys.executable, "-c", FAKE_SERVER, str(port), mode]
    return start_server(command, port=port, log=tmp_path / "logs" / "server.log", name="fake server")


def _dead(pid: int) -> bool:
    """Exited: gone, or a zombie its new parent has not reaped yet."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_waits_for_health_and_sigterm_stops_the_server_with_exit_code_0(tmp_path: Path) -> None:
    server = _start(tmp_path, "healthy")
    try:
        assert server.wait_healthy(timeout_s=30, poll_s=0.05) > 0  # it sleeps before it listens
        assert server.healthy() and server.url.startswith("http://127.0.0.1:")
        assert group_members(server.pid) == [server.pid]  # its own group, which it leads
    finally:
        stopped = server.stop(timeout_s=30)
    assert stopped == Stopped(exit_code=0, killed=False, left_behind=())
    assert not group_members(server.pid) and not server.healthy()
    assert server.stop() == stopped  # a second stop is harmless


def test_a_server_that_ignores_sigterm_is_killed_with_its_group_after_the_timeout(tmp_path: Path) -> None:
    server = _start(tmp_path, "ignores-sigterm")
    try:
        server.wait_healthy(timeout_s=30, poll_s=0.05)
        begin = time.monotonic()
        stopped = server.stop(timeout_s=1)
    finally:
        server.stop(timeout_s=1)
    assert time.monotonic() - begin >= 1  # SIGTERM had its chance
    assert stopped == Stopped(exit_code=-signal.SIGKILL, killed=True, left_behind=())
    assert not group_members(server.pid)


def test_processes_the_server_leaves_behind_are_killed_and_reported(tmp_path: Path) -> None:
    server = _start(tmp_path, "leaves-a-process")
    try:
        server.wait_healthy(timeout_s=30, poll_s=0.05)
        helper = int(server.log.read_text().split("helper pid ")[1].split()[0])
        assert sorted(group_members(server.pid)) == sorted([server.pid, helper])
        stopped = server.stop(timeout_s=30)
    finally:
        server.stop(timeout_s=1)
    assert stopped == Stopped(exit_code=0, killed=False, left_behind=(helper,))
    assert _dead(helper) and not group_members(server.pid)


def test_a_server_exiting_before_it_is_healthy_raises_with_its_log_tail(tmp_path: Path) -> None:
    server = _start(tmp_path, "exits-early")
    try:
        with pytest.raises(ServerError) as raised:
            server.wait_healthy(timeout_s=30, poll_s=0.05)
    finally:
        server.stop(timeout_s=1)
    assert raised.value.what == "fake server exited with code 3 before it was healthy"
    assert raised.value.log_tail.splitlines() == [
        "fake server starting: exits-early",
        "error: no such export directory",
    ]
    assert str(raised.value).endswith("error: no such export directory\n")


def test_a_server_never_healthy_raises_after_the_timeout_and_stops(tmp_path: Path) -> None:
    server = _start(tmp_path, "never-healthy")
    try:
        begin = time.monotonic()
        with pytest.raises(ServerError, match="fake server not healthy after 1 s") as raised:
            server.wait_healthy(timeout_s=1, poll_s=0.05)
        assert time.monotonic() - begin >= 1
        assert raised.value.log_tail == "fake server starting: never-healthy\n"
    finally:
        stopped = server.stop(timeout_s=10)
    assert stopped == Stopped(exit_code=-signal.SIGTERM, killed=False, left_behind=())


def test_log_tail_keeps_the_last_lines(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    server = ServerProcess(subprocess.Popen([sys.executable, "-c", "pass"]), "http://127.0.0.1:1", log, "x")
    server.proc.wait()
    assert server.log_tail(3) == "line 97\nline 98\nline 99\n"
    assert server.error("broke").log_tail.count("\n") == 60  # LOG_TAIL_LINES


def test_the_module_imports_neither_vllm_nor_torch_nor_training() -> None:
    """Client-side tooling: a demo or benchmark process that only starts servers stays light."""
    code = (
        "import sys, badit_serve.launch.server_process;"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'vllm', 'torch', 'training', 'transformers'}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]"
