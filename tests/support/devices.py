"""Where and in which precision a test trains: CPU float32, CPU bfloat16 under autocast, and CUDA.

The CUDA case carries the `gpu` marker and is skipped without a GPU (`make gpu-check` runs them)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pytest
import torch


@dataclass(frozen=True)
class Precision:
    """A training setting: device, dtype of the frozen base weights, bfloat16 autocast on or off."""

    device: str
    base_dtype: torch.dtype
    autocast: bool

    def context(self) -> contextlib.AbstractContextManager:
        """The autocast region a training step runs in (as the trainer opens it)."""
        return torch.autocast(device_type=self.device, dtype=torch.bfloat16, enabled=self.autocast)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PRECISIONS = [
    pytest.param(Precision("cpu", torch.float32, False), id="cpu-fp32"),
    pytest.param(Precision("cpu", torch.bfloat16, True), id="cpu-bf16-autocast"),
    pytest.param(
        Precision("cuda", torch.bfloat16, True), id="cuda-bf16-autocast", marks=[pytest.mark.gpu, CUDA]
    ),
]
