"""Shared fixtures: the prepared default model and tiny random models of each family."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.tiny_models import FAMILIES, build_tiny_model
from training.config import SUPERNI_DIR_ENV, superni_dir_from_env
from training.model_store import resolve_model

# The tests run from a checkout: default the data directory to ../shared/superni beside it (as `make` and
# .ci/run do), so a bare `pytest` finds the shared data too. The package itself never guesses this path.
os.environ.setdefault(
    SUPERNI_DIR_ENV, str(Path(__file__).resolve().parent.parent.parent / "shared" / "superni")
)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The prepared SmolLM2-135M-Instruct directory (prepared on first use, offline)."""
    return resolve_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> dict[str, Path]:
    """family -> saved tiny random model directory (with the default model's tokenizer)."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {family: build_tiny_model(family, default_model_dir, root / family) for family in FAMILIES}


@pytest.fixture(params=FAMILIES)
def tiny_model_dir(request: pytest.FixtureRequest, tiny_model_dirs: dict[str, Path]) -> Path:
    """Each tiny family in turn."""
    return tiny_model_dirs[request.param]


@pytest.fixture(scope="session")
def superni_dir() -> Path:
    """The shared 15-task SuperNI directory: $BADIT_SUPERNI_DIR (default set above)."""
    path = superni_dir_from_env()
    if path is None or not path.is_dir():
        pytest.skip(f"SuperNI data not found at ${SUPERNI_DIR_ENV}={path}")
    return path
