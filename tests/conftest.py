"""Shared fixtures: the prepared default model, a tiny tokenizer and tiny random models of each family."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.tiny_models import FAMILIES, build_tiny_model, build_tiny_tokenizer
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
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny byte-level BPE tokenizer with the default model's special tokens and chat format."""
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> dict[str, Path]:
    """family -> saved tiny random model directory (with the tiny tokenizer)."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {family: build_tiny_model(family, tiny_tokenizer_dir, root / family) for family in FAMILIES}


@pytest.fixture(scope="session")
def tiny_llama_default_tokenizer_dir(
    tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path
) -> Path:
    """The tiny llama with the default model's tokenizer, for the data-parallel equality test (slow tier).

    That test compares weights to 1e-6 after 4 Adam steps; with the tiny tokenizer's data a router entry
    whose gradient is ~0 takes its update's sign from reduction-order rounding (up to 1.2e-4 apart, losses
    and regroups equal), so it keeps the inputs it was calibrated on."""
    return build_tiny_model("llama", default_model_dir, tmp_path_factory.mktemp("tiny_llama_default_tok"))


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
