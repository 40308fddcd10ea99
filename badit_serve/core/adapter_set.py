"""The adapters of one multi-adapter server (`badit-serve BASE_MODEL_DIR --adapter NAME=DIR ...`), validated.

Every adapter is validated before vLLM starts, and again when one is POSTed at runtime: manifest and
checksums, tensor shapes, the base fingerprint against BASE_MODEL_DIR, the same expert geometry as the first
adapter. The vLLM options that serve the set are `badit_serve.launch.vllm_options`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from badit_serve.core.adapter import (
    LoadedAdapter,
    SlotGeometry,
    base_dir_fingerprint,
    check_base,
    load_adapter,
)
from badit_serve.core.architectures import BADIT_ARCHITECTURES
from badit_serve.core.export_io import ExportError, read_json
from badit_serve.core.servable import check_block_servable


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
    config = read_json(base_dir / "config.json")
    if "badit" in config:
        raise ExportError(
            f"{base_dir}: is a full Badit export; --adapter needs the plain base model directory it was trained on"
        )
    arch = (config.get("architectures") or [None])[0]
    if arch not in BADIT_ARCHITECTURES:
        raise ExportError(
            f"{base_dir}: architecture {arch!r} cannot serve Badit adapters ({sorted(BADIT_ARCHITECTURES)})"
        )
    assert isinstance(arch, str)  # a key of BADIT_ARCHITECTURES
    return arch


def validate_adapter(
    path: Path, base_dir: Path, fingerprint: str, geometry: SlotGeometry | None, verify_checksums: bool = True
) -> LoadedAdapter:
    """Load an adapter and check it against the base (fingerprint) and the served geometry."""
    adapter = load_adapter(path, verify_checksums=verify_checksums)
    try:
        check_block_servable(adapter.block)
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
