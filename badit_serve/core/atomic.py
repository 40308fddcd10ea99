"""Atomic directory writes: every writer of a directory (exports, dense exports, checkpoints, prepared
models) fills a temporary sibling and renames it into place, so a reader never sees a half-written one.

    with atomic_directory(out_dir, force=force) as staging:
        (staging / "config.json").write_text(...)

One `--force` behaviour everywhere: an existing target is an error (`TargetExistsError`, the target kept
untouched) unless `force`, in which case it is replaced only after the new directory is complete (old moved
aside, new renamed in, old removed). On any exception, `KeyboardInterrupt` included, the staging directory
is removed and the target is left as it was. Files and directories are fsynced before the rename, and the
result is world-readable (0755 / 0644): `mkdtemp` makes 0700 and safetensors >= 0.8 writes 0600, but a
server running as another user (e.g. the container image's) must read exports and prepared models.

A writer killed outright (kill -9, power loss) leaves its staging directory `.NAME.partial.PID@HOST.xxx`
(or, killed between the two renames of a `--force` swap, the old target aside as `.NAME.old.PID@HOST.xxx`)
beside the target. The next write to the same target removes those whose writer is gone (`clean_stale`):
same host, and no process with that pid; an old target aside is renamed back when the target is missing.
A live writer's directories, another host's, and unowned names from before pids were recorded are left.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path


class TargetExistsError(FileExistsError):
    """The target directory exists and `force` was not given; the message says how to replace it."""


def make_world_readable(directory: Path) -> None:
    """Mode 0755 for `directory` and 0644 for the files in it."""
    directory.chmod(0o755)
    for path in directory.iterdir():
        if path.is_file():
            path.chmod(0o644)


def _fsync(path: Path) -> None:
    """Flush a file's or a directory's entry to disk (directories: best effort where unsupported)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() and hasattr(os, "O_DIRECTORY") else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # e.g. directories on platforms that cannot open them
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            _fsync(path)
    _fsync(directory)


def check_target(target: Path, force: bool) -> None:
    """Raise `TargetExistsError` when `target` exists and `force` is not set (call before expensive work)."""
    if target.exists() and not force:
        raise TargetExistsError(f"{target}: already exists (use --force to replace it)")


def owner_tag() -> str:
    """PID@HOST of this process, as written into the names of its temporary siblings."""
    return f"{os.getpid()}@{re.sub(r'[^A-Za-z0-9-]', '-', socket.gethostname())}"


def _sibling(target: Path, kind: str) -> Path:
    """A fresh empty directory `.NAME.KIND.PID@HOST.xxx` beside `target`."""
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.{kind}.{owner_tag()}.", dir=target.parent))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clean_stale(target: Path) -> list[Path]:
    """Remove the temporary siblings of `target` left by dead writers on this host; returns them.

    A `.old.` one (the previous target, moved aside by a killed `--force` swap) is renamed back when
    `target` is missing, else removed."""
    host = owner_tag().split("@", 1)[1]
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(partial|old)\.(\d+)@{re.escape(host)}\.")
    cleaned = []
    for path in target.parent.glob(f".{target.name}.*"):
        match = pattern.match(path.name)
        if not match or not path.is_dir() or _alive(int(match.group(2))):
            continue
        if match.group(1) == "old" and not target.exists():
            path.rename(target)
        else:
            shutil.rmtree(path, ignore_errors=True)
        cleaned.append(path)
    return cleaned


def _swap_in(staging: Path, target: Path) -> None:
    """Rename `staging` to `target`; an existing target is moved aside first and removed afterwards."""
    if not target.exists():
        staging.rename(target)
        return
    old = _sibling(target, "old")
    old.rmdir()  # a fresh unused name for the old directory
    target.rename(old)
    try:
        staging.rename(target)
    except BaseException:
        old.rename(target)  # put the old one back
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike[str], *, force: bool = False) -> Iterator[Path]:
    """Yield a staging directory beside `target`; on normal exit it becomes `target` (see module doc)."""
    target = Path(target)
    if target.parent.is_dir():
        clean_stale(target)  # first: it may put back a target a killed --force swap had moved aside
    check_target(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(target, "partial")
    try:
        yield staging
        make_world_readable(staging)
        _sync_tree(staging)
        check_target(target, force)  # another writer may have finished meanwhile
        _swap_in(staging, target)
        _fsync(target.parent)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small file through a temporary sibling and `os.replace`, so readers see old or new text."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
