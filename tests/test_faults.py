"""Faults survived by badit-train and badit-export on tiny models (issue 15).

- kill -9 of badit-train while it writes a checkpoint, then --resume: it continues from the last complete
  checkpoint and ends with the same weights as an uninterrupted run;
- kill -9 of badit-export while it writes: nothing appears at OUT_DIR (or the old export stays), and a
  re-run succeeds and removes the killed writer's staging directory;
- a full disk (a real small tmpfs mount, so writes fail with ENOSPC as on a full disk) during a checkpoint
  and during an export: one clear error line, exit code 1, the previous checkpoint or export intact.

The kill is exact: the child process runs the real command with the module's `write_tensors` wrapped so
that, at the chosen write, it writes half the file and then SIGKILLs itself.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from badit_serve.core.export_io import load_export
from tests.support.training_runs import train_cli, train_overrides
from training.checkpoint import latest_checkpoint, load_checkpoint
from training.cli.export import main as export_main
from training.config import load_config
from training.hooks import TrainerHook, TrainState
from training.run import run
from training.run_dir import RunDir

pytestmark = [pytest.mark.slow, pytest.mark.train]

RUN = {
    "train.max_steps": 4,
    "output.checkpoint_every": 1,
    "adapter.dropout": 0.1,
    "eval.enabled": "false",
    "adapter.dog.schedule": "every_n_steps",
    "adapter.dog.every_n_steps": 3,
}

KILL_AT_WRITE = """
import os, signal, sys
import {module} as target

real, calls = target.write_tensors, [0]

def write_then_die(path, tensors, metadata=None):
    calls[0] += 1
    real(path, tensors, metadata)
    if calls[0] == {nth}:
        os.truncate(path, os.path.getsize(path) // 2)  # the write is half done
        os.kill(os.getpid(), signal.SIGKILL)

target.write_tensors = write_then_die
from {cli} import main
sys.exit(main(sys.argv[1:]))
"""


def _killed_at_write(module: str, cli: str, nth: int, args: list[str], cwd: Path) -> None:
    """Run `cli` with its `nth` tensor write in `module` killed half-way; assert it died by SIGKILL."""
    code = KILL_AT_WRITE.format(module=module, cli=cli, nth=nth)
    done = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]


def _same_adapters(a: Path, b: Path) -> None:
    left, right = load_checkpoint(a), load_checkpoint(b)
    assert left.progress.global_step == right.progress.global_step
    assert left.adapter.keys() == right.adapter.keys()
    for key in left.adapter:
        torch.testing.assert_close(right.adapter[key], left.adapter[key], atol=1e-6, rtol=0, msg=key)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs mounted for this test (needs root; CI runs as root)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (not root?): {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def _fill(disk: Path, leave_bytes: int) -> None:
    """Fill `disk` up to `leave_bytes` of free space."""
    stat = os.statvfs(disk)
    free = stat.f_bavail * stat.f_frsize
    with (disk / "filler").open("wb") as out:
        out.write(b"\0" * max(0, free - leave_bytes))


class FillDiskAfter(TrainerHook):
    """Test-only hook: after global step `step` (and its checkpoint), leave less room than a checkpoint."""

    def __init__(self, disk: Path, step: int, leave_bytes: int) -> None:
        self.disk, self.step, self.leave_bytes = disk, step, leave_bytes

    def on_step_end(self, state: TrainState) -> None:
        if state.global_step == self.step:
            _fill(self.disk, self.leave_bytes)


def _size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def reference(tiny_model_dirs, superni_dir, tmp_path_factory) -> Path:
    """An uninterrupted run (the result a resumed one must match)."""
    out = tmp_path_factory.mktemp("faults") / "whole"
    run(
        load_config(None, train_overrides(tiny_model_dirs["qwen3"], superni_dir, out, **RUN)),
        show_progress=False,
    )
    return out


def test_kill_9_during_a_checkpoint_write_then_resume_equals_an_uninterrupted_run(
    tiny_model_dirs, superni_dir, tmp_path, reference
) -> None:
    out = tmp_path / "killed"
    overrides = train_overrides(tiny_model_dirs["qwen3"], superni_dir, out, **RUN)
    args = ["--no-progress"] + [arg for item in overrides for arg in ("--set", item)]
    _killed_at_write("training.checkpoint", "training.cli.train", 3, args, tmp_path)  # the step-3 checkpoint
    run_dir = RunDir(out)
    assert latest_checkpoint(out) == run_dir.checkpoint(2) and not run_dir.checkpoint(3).exists()
    assert train_cli(overrides, "--resume") == 0
    _same_adapters(latest_checkpoint(reference), latest_checkpoint(out))


def test_full_disk_during_a_checkpoint_gives_a_clear_error_and_keeps_the_last_one(
    tiny_model_dirs, superni_dir, small_disk, reference, capsys
) -> None:
    out = small_disk / "run"
    cfg = load_config(None, train_overrides(tiny_model_dirs["qwen3"], superni_dir, out, **RUN))
    checkpoint_bytes = _size(latest_checkpoint(reference))
    with pytest.raises(OSError, match="No space left on device"):
        run(cfg, show_progress=False, hooks=[FillDiskAfter(small_disk, 2, checkpoint_bytes // 2)])
    assert latest_checkpoint(out) == RunDir(out).checkpoint(2)
    assert load_checkpoint(RunDir(out).checkpoint(2)).progress.global_step == 2
    assert not RunDir(out).checkpoint(3).exists() and not list(RunDir(out).checkpoints.glob(".*partial*"))
    # the command's own report of the same fault: one line and exit code 1; then, with room again, it resumes
    overrides = train_overrides(tiny_model_dirs["qwen3"], superni_dir, out, **RUN)
    assert train_cli(overrides, "--resume") == 1
    assert "badit-train: error:" in capsys.readouterr().err
    (small_disk / "filler").unlink()
    assert train_cli(overrides, "--resume") == 0
    _same_adapters(latest_checkpoint(reference), latest_checkpoint(out))


def test_kill_9_during_export_leaves_no_partial_out_dir_and_a_rerun_succeeds(reference, tmp_path) -> None:
    out_dir = tmp_path / "export"
    _killed_at_write(
        "badit_serve.core.export_io", "training.cli.export", 1, [str(reference), str(out_dir)], tmp_path
    )
    assert not out_dir.exists()
    (leftover,) = tmp_path.glob(".export.partial.*")  # the killed writer's staging, named with its pid
    assert export_main([str(reference), str(out_dir)]) == 0
    load_export(out_dir)  # complete: every checksum matches
    assert not leftover.exists()  # the re-run removed it: its writer is dead
    before = {p.name: p.read_bytes() for p in out_dir.iterdir() if p.is_file()}
    _killed_at_write(
        "badit_serve.core.export_io",
        "training.cli.export",
        1,
        [str(reference), str(out_dir), "--force"],
        tmp_path,
    )
    assert {p.name: p.read_bytes() for p in out_dir.iterdir() if p.is_file()} == before  # the old one, whole
    assert export_main([str(reference), str(out_dir), "--force"]) == 0
    load_export(out_dir)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".export")) == []  # nothing left


def test_full_disk_during_export_gives_a_clear_error_and_keeps_the_previous_export(
    reference, small_disk, capsys
) -> None:
    out_dir = small_disk / "export"
    assert export_main([str(reference), str(out_dir)]) == 0
    capsys.readouterr()
    _fill(small_disk, _size(out_dir) // 2)
    assert export_main([str(reference), str(out_dir), "--force"]) == 1
    err = capsys.readouterr().err
    assert "badit-export: error:" in err and "No space left on device" in err, err
    load_export(out_dir)  # the previous export, every checksum intact
    assert sorted(p.name for p in small_disk.iterdir()) == ["export", "filler"]  # no staging left behind
    shutil.rmtree(out_dir)
