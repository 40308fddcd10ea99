"""The CPU feature probe: whether this CPU computes bfloat16 natively, overridable for tests.

Two things branch on it: `badit-serve`'s default dtype on CPU (bfloat16 with native support, float32
without: vLLM's x86 backend computes bfloat16 by conversion there, slower than float32), and whether the
experts' bfloat16 GEMMs go to vLLM's prepacked oneDNN kernel (`badit_serve.vllm_models.cpu_gemm`).

`BADIT_CPU_NATIVE_BF16=1` or `=0` forces the probe's answer, so both branches run on any machine (`make
test` with either value). `hardware_native_bf16()` is never overridden: tests that bound the numbers of a
computation, or that expect a kernel to exist, ask it, since forcing the probe cannot add an instruction
set to the CPU.
"""

from __future__ import annotations

import os
import platform
from functools import lru_cache
from pathlib import Path

ENV_NATIVE_BF16 = "BADIT_CPU_NATIVE_BF16"
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
"""x86 flags (/proc/cpuinfo) of native bfloat16 arithmetic: AVX512-BF16, and AMX (whose CPUs have both)."""
CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The `flags` of the first processor in /proc/cpuinfo (or in `cpuinfo`); empty where there is none."""
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


@lru_cache(maxsize=1)
def hardware_native_bf16() -> bool:
    """x86: one of `NATIVE_BF16_FLAGS`; other architectures (Arm's bf16 extensions, POWER): True, as vLLM's
    platform lists bfloat16 there and has no conversion path to prefer float32 over."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686"):
        return True
    return bool(cpu_flags() & NATIVE_BF16_FLAGS)


def parse_override(value: str | None) -> bool | None:
    """`BADIT_CPU_NATIVE_BF16`'s value: '1'/'true'/'yes' -> True, '0'/'false'/'no' -> False, unset or empty
    -> None; anything else is a ValueError naming the variable."""
    if value is None or value.strip() == "":
        return None
    word = value.strip().lower()
    if word in ("1", "true", "yes"):
        return True
    if word in ("0", "false", "no"):
        return False
    raise ValueError(f"{ENV_NATIVE_BF16}={value!r}: expected 1 or 0 (or true/false, yes/no)")


def native_bf16() -> bool:
    """The probe: `BADIT_CPU_NATIVE_BF16` where set, else `hardware_native_bf16()`."""
    forced = parse_override(os.environ.get(ENV_NATIVE_BF16))
    return hardware_native_bf16() if forced is None else forced
