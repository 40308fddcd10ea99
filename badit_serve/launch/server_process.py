"""Start a server process (badit-serve, or vLLM's OpenAI server), wait until it is healthy, stop it with
nothing left behind.

Client-side tooling shared by the demo scripts, the serving benchmark and the serving tests; it imports
neither vLLM nor `training/`. The server runs as the leader of its own session and process group, its
output (stdout and stderr) in one log file:

- `start_server` starts it; `ServerProcess.wait_healthy` polls `/health` until it answers 200, and raises
  `ServerError` (with the log's tail) when the server exits first or the timeout passes.
- `ServerProcess.stop` sends SIGTERM (badit-serve forwards it to vLLM, which aborts in-flight requests, and
  exits 0 once every process it started is gone), SIGKILLs the whole group if the server has not exited
  after the timeout or left processes behind, and raises `ServerError` if any process of the group is
  still alive `GROUP_GONE_S` after that.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

HEALTH_PATH = "/health"
LOG_TAIL_LINES = 60
STOP_TIMEOUT_S = 60.0
"""SIGTERM -> the server has exited (badit-serve under load: about 2 s on the 2-core CPU machine)."""
GROUP_GONE_S = 30.0
"""SIGKILL to the group -> no process of it alive (the kernel tears them down)."""


class ServerError(RuntimeError):
    """The server exited early, was not healthy in time, or left processes that would not die.

    `str()` is what happened followed by the tail of the server's log; `log_tail` is that tail alone."""

    def __init__(self, what: str, log_tail: str) -> None:
        super().__init__(f"{what}; last lines of its log:\n{log_tail}" if log_tail else what)
        self.what = what
        self.log_tail = log_tail


@dataclass(frozen=True)
class Stopped:
    """How `ServerProcess.stop` ended a server."""

    exit_code: int
    """The server's exit code (negative: the signal that ended it, as `subprocess.Popen.returncode`)."""
    killed: bool
    """It had not exited `timeout_s` after the signal and was SIGKILLed with its group."""
    left_behind: tuple[int, ...]
    """PIDs of its group still alive when it had exited (then SIGKILLed); badit-serve leaves none."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now (the server binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def group_members(pgid: int) -> list[int]:
    """PIDs of the live processes of process group `pgid` (zombies, already dead, are not counted)."""
    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
        except (OSError, psutil.Error):  # exited while listed
            continue
    return members


@dataclass
class ServerProcess:
    """A server started by `start_server`: the leader of its own session and process group."""

    proc: subprocess.Popen[bytes]
    url: str
    """http://HOST:PORT, no trailing slash."""
    log: Path
    """The server's stdout and stderr."""
    name: str
    """What messages call it (e.g. "badit-serve")."""

    @property
    def pid(self) -> int:
        """The server's PID, which is also its process group's id."""
        return self.proc.pid

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        if not self.log.exists():
            return ""
        return "".join(self.log.read_text(errors="replace").splitlines(keepends=True)[-lines:])

    def error(self, what: str) -> ServerError:
        """A `ServerError` saying `what` happened to this server, with the tail of its log."""
        return ServerError(f"{self.name} {what}", self.log_tail())

    def healthy(self, timeout_s: float = 5.0) -> bool:
        """Whether `/health` answers 200 now."""
        try:
            with urllib.request.urlopen(f"{self.url}{HEALTH_PATH}", timeout=timeout_s) as response:
                return bool(response.status == 200)
        except OSError:  # refused, reset, timed out, or an HTTP error status
            return False

    def wait_healthy(self, timeout_s: float, poll_s: float = 1.0) -> float:
        """Poll `/health` until it answers 200; the seconds waited. `ServerError` with the log tail if the
        server exits first or is not healthy after `timeout_s`."""
        start = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise self.error(f"exited with code {self.proc.returncode} before it was healthy")
            if self.healthy():
                return time.monotonic() - start
            if time.monotonic() - start > timeout_s:
                raise self.error(f"not healthy after {timeout_s:.0f} s")
            time.sleep(poll_s)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S, signum: int = signal.SIGTERM) -> Stopped:
        """Send `signum`, wait up to `timeout_s` for the server to exit, SIGKILL whatever of its group is
        still alive, and return once none is. `ServerError` if some process of the group survives
        `GROUP_GONE_S` after SIGKILL. Calling it again (or on a server that has exited) is harmless."""
        killed = False
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                killed = True
        left = group_members(self.pid)
        if left:
            _kill_group(self.pid)
        deadline = time.monotonic() + GROUP_GONE_S
        while alive := group_members(self.pid):  # the server itself included until it is a zombie
            if time.monotonic() > deadline:
                raise self.error(
                    f"left processes {alive} of its group {self.pid} alive {GROUP_GONE_S:.0f} s after SIGKILL"
                )
            time.sleep(0.1)
        self.proc.wait()  # reaps it: dead by now
        return Stopped(self.proc.returncode, killed, tuple(pid for pid in left if pid != self.pid))

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(
    command: Sequence[str],
    *,
    port: int,
    log: Path,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    host: str = "127.0.0.1",
    name: str | None = None,
) -> ServerProcess:
    """Start `command` (which must serve on `host`:`port`) in its own session and process group, its output
    to `log` (created, with its parent, or truncated). `name` defaults to the command's program name."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        proc = subprocess.Popen(
            list(command),
            cwd=cwd,
            env=None if env is None else dict(env),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return ServerProcess(proc, f"http://{host}:{port}", log, name or Path(command[0]).name)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # exited in between
