"""Shared fixtures: the prepared default model and tiny random models of each family."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_models import FAMILIES, build_tiny_model
from training.model_store import resolve_model


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
    """The shared 15-task SuperNI directory beside the project root."""
    from training.config import DEFAULT_SUPERNI_DIR

    if not DEFAULT_SUPERNI_DIR.is_dir():
        pytest.skip(f"SuperNI data not found at {DEFAULT_SUPERNI_DIR}")
    return DEFAULT_SUPERNI_DIR
