"""badit-serve's parent process: every process the server starts ends with it, within a bound.

vLLM's API server starts an EngineCore process, which starts its workers (multiprocessing, spawn), and a
multiprocessing resource tracker. On SIGTERM or SIGINT the API server aborts the in-flight requests (each
open stream gets an error event and `data: [DONE]`), SIGKILLs the EngineCore's process tree and returns
at once, without waiting for those processes to die: a worker freeing its memory, and the resource tracker
(which exits only once every process holding its pipe has, then unlinks the shared memory left behind),
outlived the API server by seconds, orphaned to init.

So `badit-serve` runs the server as a child and stays its parent: it marks itself a child subreaper (Linux
`PR_SET_CHILD_SUBREAPER`, so orphaned descendants are re-parented to it rather than to init), forwards
SIGTERM / SIGINT / SIGHUP to the server, and once the server has exited waits for every remaining
descendant, SIGKILLs any still alive after `grace_s`, reaps them all, and only then exits with the server's
exit code. When `badit-serve` exits, no process it started is left.

A supervisor killed outright (SIGKILL, the OOM killer) runs none of that, so the server also holds a
lifeline: the read end of a pipe whose only write end the supervisor holds (`BADIT_LIFELINE_FD`). The
kernel closes that end whatever ends the supervisor; the server's `watch_lifeline` thread then reads EOF,
SIGKILLs every descendant of the server (EngineCore, workers, resource tracker) and then the server itself.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

import psutil

PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
DESCENDANT_GRACE_S = 10.0  # after the server exits, time for the rest to exit by themselves
KILL_WAIT_S = 5.0  # after SIGKILL, time for the kernel to tear them down
ENV_LIFELINE_FD = "BADIT_LIFELINE_FD"


@dataclass(frozen=True)
class Ended:
    """How a supervised server ended."""

    exit_code: int
    """The server's exit code (128 + N when signal N ended it)."""
    waited_for: int
    """Descendants still alive when the server exited (all of them reaped before returning)."""
    killed: int
    """Of those, how many needed SIGKILL after the grace period."""


def set_subreaper(on: bool) -> bool:
    """Re-parent orphaned descendants to this process instead of init, or stop (Linux only; False
    elsewhere)."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) == 0)


def supervise(command: list[str], env: Mapping[str, str], grace_s: float = DESCENDANT_GRACE_S) -> Ended:
    """Run `command` as a child, forward termination signals to it, then end every descendant it left."""
    set_subreaper(True)
    pending: list[int] = []
    child: subprocess.Popen[bytes] | None = None

    def forward(signum: int, _frame: object) -> None:
        if child is None:
            pending.append(signum)  # arrived before the child existed: sent right after it starts
        else:
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    lifeline, held = os.pipe()  # both non-inheritable: only the child gets the read end, by pass_fds
    try:
        child_env = {**env, ENV_LIFELINE_FD: str(lifeline)}
        try:
            child = subprocess.Popen(command, env=child_env, pass_fds=(lifeline,))
        finally:
            os.close(lifeline)
        for signum in pending:
            child.send_signal(signum)
        code = child.wait()
    finally:
        if child is not None and child.poll() is None:  # only when this process itself is failing
            child.kill()
            child.wait()
        waited, killed = end_descendants(grace_s)
        os.close(held)
        set_subreaper(False)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return Ended(code if code >= 0 else 128 - code, waited, killed)


def watch_lifeline(env: MutableMapping[str, str] | None = None) -> bool:
    """In the supervised server: when the supervisor's lifeline closes (the supervisor died, however), SIGKILL
    every descendant of this process, then this process. Removes the variable from the environment, so that
    processes started later do not look for a descriptor they do not have. False where there is no lifeline
    (the server was not started by `supervise`)."""
    environ = os.environ if env is None else env
    value = environ.pop(ENV_LIFELINE_FD, None)
    if value is None:
        return False
    fd = int(value)

    def watch() -> None:
        while os.read(fd, 1):  # the supervisor never writes: returns b"" only once its end is closed
            pass
        me = psutil.Process()
        for proc in me.children(recursive=True):
            _kill(proc)
        os.kill(me.pid, signal.SIGKILL)

    threading.Thread(target=watch, name="badit-lifeline", daemon=True).start()
    return True


def end_descendants(grace_s: float) -> tuple[int, int]:
    """Wait up to `grace_s` for every descendant to exit, SIGKILL the rest, reap all; (waited for, killed).

    Orphans re-parented to this subreaper appear as children while their own parents die, so the tree
    is listed again until it is empty."""
    me = psutil.Process()
    seen: set[int] = set()
    killed: set[int] = set()
    deadline = time.monotonic() + grace_s
    while descendants := _alive(me):
        seen.update(p.pid for p in descendants)
        if time.monotonic() >= deadline:
            for proc in descendants:
                killed.add(proc.pid)
                _kill(proc)
            psutil.wait_procs(descendants, timeout=KILL_WAIT_S)
            if time.monotonic() >= deadline + KILL_WAIT_S:
                break  # unkillable (uninterruptible sleep): give up rather than hang
            continue
        psutil.wait_procs(descendants, timeout=min(0.5, max(0.0, deadline - time.monotonic())))
    return len(seen), len(killed)


def _alive(me: psutil.Process) -> list[psutil.Process]:
    """Descendants not yet exited; zombies among the direct children are reaped on the way."""
    alive = []
    for proc in me.children(recursive=True):
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                if proc.ppid() == me.pid:
                    proc.wait(timeout=0)  # reap
                continue
        except (psutil.NoSuchProcess, psutil.TimeoutExpired):
            continue
        alive.append(proc)
    return alive


def _kill(proc: psutil.Process) -> None:
    try:
        proc.kill()
    except psutil.NoSuchProcess:
        pass
