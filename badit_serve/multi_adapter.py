"""`badit-serve BASE_MODEL_DIR --adapter NAME=DIR ...`: validation and the vLLM options of multi-adapter mode.

Every adapter is validated before vLLM starts (manifest and checksums, tensor shapes, the base fingerprint
against BASE_MODEL_DIR, the same expert geometry as the first adapter). vLLM then runs with its LoRA
machinery carrying the per-request choice (see `badit_serve.vllm_models.adapter_slots`):

    --enable-lora --max-loras S --max-cpu-loras S --max-lora-rank R' --lora-target-modules gate_up_proj
    --lora-modules NAME=DIR ... --hf-overrides {"architectures": [Badit class], "badit_slots": geometry}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from badit_serve.adapter import (
    LORA_TARGET,
    SLOTS_CONFIG_KEY,
    LoadedAdapter,
    SlotGeometry,
    base_dir_fingerprint,
    check_base,
    load_adapter,
)
from badit_serve.architectures import BADIT_ARCHITECTURES
from badit_serve.export_io import ExportError, _read_json
from badit_serve.vllm_models.mlp import check_servable

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""vLLM 0.32's allowed --max-lora-rank values (vllm/config/lora.py MaxLoRARanks)."""


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    path: Path

    @classmethod
    def parse(cls, text: str) -> AdapterSpec:
        name, sep, path = text.partition("=")
        if not sep or not name or not path:
            raise ExportError(f"--adapter {text!r}: expected NAME=DIR")
        return cls(name, Path(path))


@dataclass
class AdapterSet:
    """The validated base and adapters of one multi-adapter server."""

    base_dir: Path
    base_architecture: str
    fingerprint: str
    geometry: SlotGeometry
    adapters: dict[str, LoadedAdapter]


def base_architecture(base_dir: Path) -> str:
    config = _read_json(base_dir / "config.json")
    if "badit" in config:
        raise ExportError(
            f"{base_dir}: is a full Badit export; --adapter needs the plain base model directory it was trained on"
        )
    arch = (config.get("architectures") or [None])[0]
    if arch not in BADIT_ARCHITECTURES:
        raise ExportError(
            f"{base_dir}: architecture {arch!r} cannot serve Badit adapters ({sorted(BADIT_ARCHITECTURES)})"
        )
    return arch


def validate_adapter(
    path: Path, base_dir: Path, fingerprint: str, geometry: SlotGeometry | None, verify_checksums: bool = True
) -> LoadedAdapter:
    """Load an adapter and check it against the base (fingerprint) and the served geometry."""
    adapter = load_adapter(path, verify_checksums=verify_checksums)
    try:
        check_servable(adapter.block)
    except ValueError as exc:
        raise ExportError(f"{path}: {exc}") from exc
    check_base(adapter, base_dir, fingerprint)
    if geometry is not None:
        geometry.check_fits(adapter)
    return adapter


def validate_adapter_set(
    base_dir: Path, specs: list[AdapterSpec], max_adapters: int | None, verify_checksums: bool = True
) -> AdapterSet:
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ExportError(f"--adapter names must be unique, got {names}")
    arch = base_architecture(base_dir)
    first = load_adapter(specs[0].path, verify_checksums=verify_checksums)
    slots = len(specs) if max_adapters is None else max_adapters
    if slots < len(specs):
        raise ExportError(f"--max-adapters {slots} is less than the {len(specs)} adapters given")
    geometry = SlotGeometry.of(first.block, slots)
    fingerprint = base_dir_fingerprint(base_dir, geometry.adapted_modules)
    adapters = {
        s.name: validate_adapter(s.path, base_dir, fingerprint, geometry, verify_checksums) for s in specs
    }
    return AdapterSet(base_dir, arch, fingerprint, geometry, adapters)


def lora_rank_limit(rank: int) -> int:
    """The smallest vLLM --max-lora-rank that admits adapters of stored rank `rank`."""
    fits = [r for r in VLLM_LORA_RANKS if r >= rank]
    if not fits:
        raise ExportError(f"expert rank {rank} exceeds vLLM's largest --max-lora-rank {VLLM_LORA_RANKS[-1]}")
    return fits[0]


def vllm_engine_kwargs(adapter_set: AdapterSet) -> dict[str, Any]:
    """vLLM EngineArgs of multi-adapter mode (see the module docstring); the adapters themselves are
    LoRARequests (the server's --lora-modules)."""
    g = adapter_set.geometry
    return {
        "enable_lora": True,
        "max_loras": g.max_adapters,
        "max_cpu_loras": g.max_adapters,
        "max_lora_rank": lora_rank_limit(g.rank),
        "lora_target_modules": [LORA_TARGET],
        "hf_overrides": {
            "architectures": [BADIT_ARCHITECTURES[adapter_set.base_architecture]],
            SLOTS_CONFIG_KEY: g.model_dump(mode="json"),
        },
    }


def vllm_adapter_args(adapter_set: AdapterSet) -> list[str]:
    """`vllm_engine_kwargs` as serve options, plus --lora-modules NAME=DIR for every adapter."""
    argv = []
    for key, value in vllm_engine_kwargs(adapter_set).items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, json.dumps(value) if isinstance(value, dict) else str(value)]
    if adapter_set.adapters:
        argv += ["--lora-modules", *(f"{n}={a.path}" for n, a in adapter_set.adapters.items())]
    return argv
