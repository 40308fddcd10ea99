"""Writing safetensors files with the errors every Badit command understands.

`safetensors.torch.save_file` reports a full disk (or any failed write) as `SafetensorError`, which is
not an `OSError`: the commands' error handling (`badit_serve.core.exit_codes.run_cli`) then printed a traceback
instead of one line and exit code 1. `write_tensors` raises an `OSError` naming the file instead.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file


def write_tensors(
    path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """`save_file`, but a failed write is an `OSError` naming `path` (errno kept where the message has it)."""
    try:
        save_file(dict(tensors), str(path), metadata=metadata)
    except SafetensorError as exc:
        code = re.search(r"os error (\d+)", str(exc))
        number = int(code.group(1)) if code else errno.EIO
        raise OSError(number, f"cannot write tensors: {exc}", str(Path(path))) from exc
