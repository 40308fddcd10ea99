"""Where llm-compressor's environment is: its own virtual environment beside the project's (`make setup`
creates `.venv-llmcompressor`, layered over `.venv` so that it shares its torch), or the Python named by
$BADIT_LLMCOMPRESSOR_PYTHON."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV_PYTHON = "BADIT_LLMCOMPRESSOR_PYTHON"
ENV_SUFFIX = "-llmcompressor"
LLMCOMPRESSOR_VERSION = "0.14.0.1"
"""The version `make setup` installs and `badit-model quantize` was tested with."""


class ToolEnvError(RuntimeError):
    """llm-compressor's environment is missing; the message says how to make or name one."""


def default_python() -> Path:
    """`ENV-llmcompressor/bin/python` beside the running environment ENV (`.venv` in a checkout: what
    `make setup` creates)."""
    return Path(sys.prefix + ENV_SUFFIX) / "bin" / "python"


def llmcompressor_python() -> Path:
    """The Python of llm-compressor's environment, or ToolEnvError naming where it was looked for."""
    given = os.environ.get(ENV_PYTHON)
    python = Path(given) if given else default_python()
    if not python.is_file():
        where = f"${ENV_PYTHON}={given}" if given else f"{python} (default; ${ENV_PYTHON} names another)"
        raise ToolEnvError(
            f"llm-compressor's environment not found at {where}: run `make setup`, or create one with "
            f"`python -m venv ENV && ENV/bin/pip install llmcompressor=={LLMCOMPRESSOR_VERSION}`"
        )
    return python
