"""The CPU feature probe (badit_serve/core/cpu_features.py): flags read from /proc/cpuinfo's text, the
override's values, and that forcing the probe changes what branches on it but never the hardware answer."""

from __future__ import annotations

import pytest

from badit_serve.core import cpu_features
from badit_serve.core.cpu_features import (
    ENV_NATIVE_BF16,
    cpu_flags,
    hardware_native_bf16,
    native_bf16,
    parse_override,
)
from badit_serve.launch.cli import default_dtype

AVX2_ONLY = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\n"
AVX512_BF16 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n"


def test_flags_come_from_the_first_processor() -> None:
    assert cpu_flags(AVX2_ONLY) == {"fpu", "sse2", "avx", "avx2", "fma"}
    assert "avx512_bf16" in cpu_flags(AVX512_BF16)
    assert cpu_flags("processor : 0\n") == frozenset()


@pytest.mark.parametrize(("text", "value"), [("1", True), ("true", True), (" yes ", True), ("0", False)])
def test_override_values(text: str, value: bool) -> None:
    assert parse_override(text) is value


def test_override_unset_or_empty_is_no_override_and_junk_names_the_variable() -> None:
    assert parse_override(None) is None and parse_override("") is None
    with pytest.raises(ValueError, match=ENV_NATIVE_BF16):
        parse_override("maybe")


@pytest.mark.parametrize("forced", [True, False])
def test_forcing_the_probe_changes_its_answer_not_the_hardware_one(
    monkeypatch: pytest.MonkeyPatch, forced: bool
) -> None:
    hardware = hardware_native_bf16()
    monkeypatch.setenv(ENV_NATIVE_BF16, "1" if forced else "0")
    assert native_bf16() is forced
    assert hardware_native_bf16() is hardware
    monkeypatch.delenv(ENV_NATIVE_BF16)
    assert native_bf16() is hardware


def test_hardware_answer_follows_the_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_features.platform, "machine", lambda: "x86_64")
    for text, expected in ((AVX2_ONLY, False), (AVX512_BF16, True)):
        monkeypatch.setattr(cpu_features, "cpu_flags", lambda t=text: cpu_flags(t))
        cpu_features.hardware_native_bf16.cache_clear()
        assert cpu_features.hardware_native_bf16() is expected
    cpu_features.hardware_native_bf16.cache_clear()


@pytest.mark.parametrize(("forced", "dtype"), [("1", "bfloat16"), ("0", "float32")])
def test_served_dtype_on_cpu_follows_the_probe(
    monkeypatch: pytest.MonkeyPatch, forced: str, dtype: str
) -> None:
    monkeypatch.setenv(ENV_NATIVE_BF16, forced)
    assert default_dtype(True, ["bfloat16", "float16", "float32"], native_bf16())[0] == dtype
