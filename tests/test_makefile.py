"""The Makefile's targets do what the README says: `make test` is the test suite (CI runs it), each target
defined once."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def dry_run(target: str) -> subprocess.CompletedProcess:
    """`make -n TARGET`: the commands it would run, nothing executed."""
    return subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, check=True)


def test_make_test_runs_the_pytest_suite_and_no_target_is_defined_twice() -> None:
    run = dry_run("test")
    assert "-m pytest -q tests" in run.stdout
    assert "image_test" not in run.stdout
    assert "overriding recipe" not in run.stderr, run.stderr


@pytest.mark.parametrize(
    ("target", "command"),
    [
        ("test-fast", 'not slow and not serve and not train" tests'),
        ("demo", "scripts/demo.sh"),
        ("multi-demo", "scripts/multi_adapter_demo.py"),
        ("image-test", "scripts/image_test.sh"),
        ("lint", "ruff format --check"),
    ],
)
def test_each_documented_target_runs_its_command(target: str, command: str) -> None:
    assert command in dry_run(target).stdout
