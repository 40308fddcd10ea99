"""badit_serve.launch.supervisor: no process the server started outlives badit-serve, whatever the server left.

The fake servers here do what vLLM's API server does on SIGTERM: return while processes it started are
still alive (one orphaned by its exit, one that ignores SIGTERM)."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

import psutil
import pytest

from badit_serve.launch.supervisor import supervise

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="child subreaper is Linux only")

LEAVES_A_CHILD = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", sys.argv[2]])
open(sys.argv[1], "w").write(str(child.pid))
"""  # exits at once; its child is orphaned
IGNORES_SIGTERM = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
EXITS_SOON = "import time; time.sleep(0.5)"


def _gone(pid: int) -> bool:
    """Neither alive nor a zombie waiting to be reaped."""
    try:
        psutil.Process(pid)
    except psutil.NoSuchProcess:
        return True
    return False


@pytest.mark.parametrize(
    ("orphan", "killed"), [(IGNORES_SIGTERM, 1), (EXITS_SOON, 0)], ids=["ignores-sigterm", "exits-soon"]
)
def test_orphans_of_the_server_are_waited_for_killed_after_the_grace_and_reaped(
    tmp_path: Path, orphan: str, killed: int
) -> None:
    """Fails without the supervisor's end_descendants: the orphan lives on (the SIGTERM-proof one 60 s)."""
    pid_file = tmp_path / "orphan.pid"
    ended = supervise([sys.executable, "-c", LEAVES_A_CHILD, str(pid_file), orphan], os.environ, grace_s=2)
    assert (ended.exit_code, ended.waited_for, ended.killed) == (0, 1, killed)
    assert _gone(int(pid_file.read_text()))
    assert not psutil.Process().children(recursive=True)


def test_sigterm_is_forwarded_and_its_exit_code_reported() -> None:
    before = signal.getsignal(signal.SIGTERM)
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        ended = supervise([sys.executable, "-c", "import time; time.sleep(30)"], os.environ, grace_s=1)
    finally:
        timer.cancel()
    assert ended.exit_code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before


SERVER_WITH_LIFELINE = """
import subprocess, sys, time
from badit_serve.launch.supervisor import watch_lifeline
assert watch_lifeline()
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
open(sys.argv[1], "w").write(f"{child.pid}")
time.sleep(60)
"""
SUPERVISOR = (
    "import os, sys; from badit_serve.launch.supervisor import supervise; supervise(sys.argv[1:], os.environ)"
)


def test_kill_9_of_the_supervisor_ends_the_server_and_its_processes(tmp_path: Path) -> None:
    """A real SIGKILL of the supervisor (as a harness or the OOM killer gives it) runs none of its cleanup;
    the server's lifeline thread ends the server's tree instead. Without it both sleep on for 60 s."""
    import subprocess
    import time

    pid_file = tmp_path / "grandchild.pid"
    supervisor = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR, sys.executable, "-c", SERVER_WITH_LIFELINE, str(pid_file)],
        start_new_session=True,
    )
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline and supervisor.poll() is None, "the fake server never started"
        time.sleep(0.05)
    server = psutil.Process(supervisor.pid).children()[0]
    grandchild = int(pid_file.read_text())
    assert not _gone(server.pid) and not _gone(grandchild)
    os.kill(supervisor.pid, signal.SIGKILL)
    supervisor.wait()
    deadline = time.monotonic() + 10
    while not (_gone_or_zombie(server.pid) and _gone_or_zombie(grandchild)):
        assert time.monotonic() < deadline, "the server or its child outlived the killed supervisor"
        time.sleep(0.05)


def test_without_a_lifeline_the_watch_is_not_started() -> None:
    from badit_serve.launch.supervisor import watch_lifeline

    assert watch_lifeline({}) is False


def _gone_or_zombie(pid: int) -> bool:
    """Dead: gone, or a zombie waiting for its (init) parent to reap it."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
