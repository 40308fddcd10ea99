"""Definitions made once: the atomic-directory writer, the family table, exit codes, the data directory."""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from badit_serve.core.architectures import FAMILIES, MODEL_CLASSES, SUPPORTED_MODEL_TYPES
from badit_serve.core.atomic import (
    TargetExistsError,
    atomic_directory,
    atomic_write_text,
    clean_stale,
    owner_tag,
)
from badit_serve.core.exit_codes import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, run_cli
from training.config import SUPERNI_DIR_ENV, DataConfig
from training.data import DataError, load_tasks

# ------------------------------------------------------------------------------------------------ atomic


def test_atomic_directory_creates_the_target_complete_and_readable(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with atomic_directory(target) as staging:
        (staging / "a.txt").write_text("new")
        assert not target.exists()  # invisible until complete
    assert (target / "a.txt").read_text() == "new"
    assert target.stat().st_mode & 0o777 == 0o755 and (target / "a.txt").stat().st_mode & 0o777 == 0o644
    assert list(tmp_path.iterdir()) == [target]


def test_atomic_directory_keeps_an_existing_target_without_force(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(TargetExistsError, match="--force"), atomic_directory(target) as staging:
        (staging / "a.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    with atomic_directory(target, force=True) as staging:
        (staging / "a.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["a.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old one is gone


def test_atomic_directory_interrupted_leaves_the_old_target(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(KeyboardInterrupt), atomic_directory(target, force=True) as staging:
        (staging / "half.txt").write_text("half")
        raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (target / "keep.txt").read_text() == "mine"


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_atomic_directory_removes_dead_writers_leftovers_but_not_a_live_writers(tmp_path: Path) -> None:
    """A writer killed by kill -9 leaves .NAME.partial.PID@HOST.xxx (tests/test_faults.py kills one for real)."""
    target = tmp_path / "out"
    host = owner_tag().split("@", 1)[1]
    dead = tmp_path / f".out.partial.{_dead_pid()}@{host}.abc"
    live = tmp_path / f".out.partial.{os.getpid()}@{host}.def"  # this process: a writer still at work
    other_host = tmp_path / f".out.partial.{_dead_pid()}@elsewhere.ghi"  # its pid means nothing here
    unowned = tmp_path / ".out.partial.jkl"  # the name before pids were recorded
    other_target = tmp_path / f".outer.partial.{_dead_pid()}@{host}.mno"
    for leftover in (dead, live, other_host, unowned, other_target):
        leftover.mkdir()
        (leftover / "half.safetensors").write_bytes(b"\0" * 10)
    with atomic_directory(target) as staging:
        assert staging.name.startswith(f".out.partial.{os.getpid()}@{host}.")
        (staging / "a.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["out", live.name, other_host.name, unowned.name, other_target.name]
    )


def test_a_target_moved_aside_by_a_killed_force_swap_is_put_back(tmp_path: Path) -> None:
    target = tmp_path / "out"
    aside = tmp_path / f".out.old.{_dead_pid()}@{owner_tag().split('@', 1)[1]}.abc"
    aside.mkdir()
    (aside / "keep.txt").write_text("previous")
    with pytest.raises(TargetExistsError), atomic_directory(target) as staging:
        (staging / "a.txt").write_text("new")
    assert (target / "keep.txt").read_text() == "previous" and not aside.exists()
    assert clean_stale(target) == []


def test_atomic_write_text_replaces_the_file(tmp_path: Path) -> None:
    path = tmp_path / "latest"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two" and [p.name for p in tmp_path.iterdir()] == ["latest"]


# ------------------------------------------------------------------------------------------------ families


def test_every_family_has_its_badit_class_in_its_module() -> None:
    """The table's module paths and class names match the vLLM model files (read without importing vLLM)."""
    for family in FAMILIES:
        spec = importlib.util.find_spec(family.module)
        assert spec is not None and spec.origin is not None, family.module
        classes = {
            n.name for n in ast.parse(Path(spec.origin).read_text()).body if isinstance(n, ast.ClassDef)
        }
        assert family.badit_architecture in classes, family
    assert len(set(SUPPORTED_MODEL_TYPES)) == len(FAMILIES)


def test_every_plugin_class_path_names_a_class_of_its_module() -> None:
    """What vLLM's registry is given ("module:Class", lazily imported) resolves, read without importing vLLM."""
    for arch, target in MODEL_CLASSES.items():
        module, _, name = target.partition(":")
        spec = importlib.util.find_spec(module)
        assert spec is not None and spec.origin is not None, target
        classes = {
            n.name for n in ast.parse(Path(spec.origin).read_text()).body if isinstance(n, ast.ClassDef)
        }
        assert name == arch and name in classes, target


# ------------------------------------------------------------------------------------------------ exit codes


def test_run_cli_maps_errors_to_the_documented_codes(capsys: pytest.CaptureFixture[str]) -> None:
    def raises(exc: BaseException):
        def body() -> None:
            raise exc

        return body

    assert run_cli("p", lambda: None, invalid=(ValueError,)) == EXIT_OK
    assert run_cli("p", raises(ValueError("bad input")), invalid=(ValueError,)) == EXIT_USAGE
    assert run_cli("p", raises(RuntimeError("it broke")), invalid=(ValueError,)) == EXIT_FAILURE
    assert capsys.readouterr().err.splitlines() == ["p: error: bad input", "p: error: it broke"]
    with pytest.raises(KeyError):  # a bug is not swallowed
        run_cli("p", raises(KeyError("x")), invalid=(ValueError,))


# ------------------------------------------------------------------------------------------------ data dir


def test_data_directory_comes_from_config_or_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(SUPERNI_DIR_ENV, raising=False)
    assert DataConfig().superni_dir is None
    with pytest.raises(DataError, match=rf"data\.superni_dir.*\${SUPERNI_DIR_ENV}"):
        load_tasks(DataConfig())
    monkeypatch.setenv(SUPERNI_DIR_ENV, str(tmp_path / "nowhere"))
    assert DataConfig().superni_dir == tmp_path / "nowhere"
    with pytest.raises(DataError, match=rf"nowhere: SuperNI directory not found.*\${SUPERNI_DIR_ENV}"):
        load_tasks(DataConfig())
    assert DataConfig(superni_dir=tmp_path).superni_dir == tmp_path  # the config field wins
