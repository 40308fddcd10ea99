"""`quantize_base`: the full-precision base -> a quantised base directory, written atomically."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from pydantic import BaseModel, ValidationError
from safetensors import safe_open

from badit_serve.core.adapter import base_dir_fingerprint
from badit_serve.core.atomic import atomic_directory
from badit_serve.core.export_io import ExportError, read_json, write_manifest
from badit_serve.core.format import WEIGHTS_FILE, WEIGHTS_INDEX_FILE
from badit_serve.core.quantized_base import QUANTIZED_BASE_FILE, SCHEMES, Calibration, QuantizedBaseInfo
from training.quantize.calibration import CalibrationSet
from training.quantize.tool_env import llmcompressor_python

WORKER = Path(__file__).with_name("llmc_worker.py")


def gate_modules(base_dir: Path) -> list[str]:
    """Every MLP gate_proj of the base's checkpoint (the modules Badit adapters adapt), sorted."""
    if (base_dir / WEIGHTS_INDEX_FILE).is_file():
        names = list(read_json(base_dir / WEIGHTS_INDEX_FILE).get("weight_map", {}))
    else:
        with safe_open(str(base_dir / WEIGHTS_FILE), framework="pt") as handle:
            names = list(handle.keys())
    modules = sorted(n.removesuffix(".weight") for n in names if n.endswith("mlp.gate_proj.weight"))
    if not modules:
        raise ExportError(f"{base_dir}: no mlp.gate_proj weights (not a base Badit adapts)")
    return modules


def check_plain_base(base_dir: Path) -> dict[str, object]:
    config = read_json(base_dir / "config.json")
    if "badit" in config:
        raise ExportError(f"{base_dir}: is a Badit export; quantise the plain base model it was trained on")
    if "quantization_config" in config:
        raise ExportError(f"{base_dir / 'config.json'}: already quantised (quantization_config)")
    return config


def quantize_base(
    base_dir: Path, out_dir: Path, scheme: str, calibration: CalibrationSet, force: bool = False
) -> QuantizedBaseInfo:
    """Quantise `base_dir` with llm-compressor into `out_dir` (nothing is left there unless it succeeds)."""
    if scheme not in SCHEMES:
        raise ExportError(f"--scheme {scheme!r}: expected one of {sorted(SCHEMES)}")
    check_plain_base(base_dir)
    python = llmcompressor_python()
    modules = gate_modules(base_dir)
    fingerprint = base_dir_fingerprint(base_dir, modules)
    with atomic_directory(out_dir, force=force) as staging, tempfile.TemporaryDirectory() as tmp:
        samples = Path(tmp) / "calibration.jsonl"
        calibration.write_jsonl(samples)
        done = run_worker(python, base_dir, staging, scheme, samples, calibration.max_length)
        info = QuantizedBaseInfo(
            scheme=scheme,
            source_model=str(base_dir),
            source_fingerprint=fingerprint,
            fingerprint_modules=modules,
            calibration=Calibration(
                source="SuperNI training split",
                tasks=calibration.tasks,
                samples=len(calibration.rows),
                tokens=calibration.tokens,
                max_length=calibration.max_length,
            ),
            tool={"llmcompressor": done.llmcompressor, "recipe": "+".join(done.recipe)},
        )
        (staging / QUANTIZED_BASE_FILE).write_text(info.model_dump_json(indent=2))
        write_manifest(staging)
    return info


class WorkerSummary(BaseModel):
    """The JSON line `llmc_worker` prints last."""

    llmcompressor: str
    recipe: list[str]
    samples: int
    tokens: int


def run_worker(
    python: Path, base_dir: Path, out: Path, scheme: str, samples: Path, max_length: int
) -> WorkerSummary:
    """Run `llmc_worker` in llm-compressor's environment; its last output line is its JSON summary."""
    command = [str(python), str(WORKER), "--model", str(base_dir), "--out", str(out), "--scheme", scheme]
    command += ["--calibration", str(samples), "--max-seq-length", str(max_length)]
    proc = subprocess.run(command, stdout=subprocess.PIPE, text=True)  # stderr: llm-compressor's progress
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise ExportError(
            f"llm-compressor failed (exit {proc.returncode}) quantising {base_dir}: {' '.join(command)}"
        )
    try:
        return WorkerSummary.model_validate_json(lines[-1])
    except ValidationError as exc:
        raise ExportError(f"llm-compressor's worker gave no summary for {base_dir}: {exc}") from exc
