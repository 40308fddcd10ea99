"""The adapters of one multi-adapter server (`badit-serve BASE_MODEL_DIR --adapter NAME=DIR ...`), validated.

Every adapter is validated before vLLM starts, and again when one is POSTed at runtime: manifest and
checksums, tensor shapes, the base fingerprint against BASE_MODEL_DIR, the same expert geometry as the first
adapter. The vLLM options that serve the set are `badit_serve.launch.vllm_options`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from badit_serve.core.adapter import (
    ADAPTER_INFO_FILE,
    LoadedAdapter,
    SlotGeometry,
    base_dir_fingerprint,
    check_base,
    load_adapter,
)
from badit_serve.core.architectures import BADIT_ARCHITECTURES
from badit_serve.core.export_io import ExportError, read_json
from badit_serve.core.servable import check_block_servable

ENV_ADAPTER_DIR = "BADIT_ADAPTER_DIR"
"""--adapter-dir, as badit-serve passes it to the endpoint plugin in the server process."""
DEFAULT_SLOTS = 4
"""Adapter slots with --adapter-dir and no --max-adapters."""


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
    max_cpu_adapters: int
    """Adapters vLLM keeps in host memory (its LRU `max_cpu_loras`); `geometry.max_adapters` is the slots."""
    adapter_dir: Path | None = None
    """--adapter-dir: adapters loaded on their first request (`AdapterDirectory`)."""


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
    base_dir: Path,
    specs: list[AdapterSpec],
    max_adapters: int | None,
    verify_checksums: bool = True,
    adapter_dir: Path | None = None,
    max_cpu_adapters: int | None = None,
) -> AdapterSet:
    """The base, the named adapters (each validated), and the three numbers kept apart: adapters known (the
    named ones and everything under `adapter_dir`: unbounded), held in host memory (`max_cpu_adapters`,
    default twice the slots) and active in one forward pass (`max_adapters`, the slots; default the number
    of named adapters, or DEFAULT_SLOTS with a directory). The geometry comes from the first named adapter,
    else the first loadable one under `adapter_dir`."""
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ExportError(f"--adapter names must be unique, got {names}")
    if not specs and adapter_dir is None:
        raise ExportError("multi-adapter serving needs --adapter NAME=DIR or --adapter-dir DIR")
    arch = base_architecture(base_dir)
    if specs:
        first = load_adapter(specs[0].path, verify_checksums=verify_checksums)
    else:
        assert adapter_dir is not None
        first = first_adapter(adapter_dir, verify_checksums)
    slots = (
        max_adapters if max_adapters is not None else (len(specs) if adapter_dir is None else DEFAULT_SLOTS)
    )
    if slots < 1:
        raise ExportError(f"--max-adapters must be at least 1, got {slots}")
    cpu = max_cpu_adapters if max_cpu_adapters is not None else 2 * slots
    if cpu < slots:
        raise ExportError(f"--max-cpu-adapters {cpu} is less than the {slots} slots (--max-adapters)")
    geometry = SlotGeometry.of(first.block, slots)
    fingerprint = base_dir_fingerprint(base_dir, geometry.adapted_modules)
    adapters = {
        s.name: validate_adapter(s.path, base_dir, fingerprint, geometry, verify_checksums) for s in specs
    }
    return AdapterSet(base_dir, arch, fingerprint, geometry, adapters, cpu, adapter_dir)


def file_signature(path: Path) -> tuple[tuple[str, int, int], ...]:
    """What changes when an adapter directory's files change: (name, size, mtime_ns) of every file in it."""
    entries = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else []
    return tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in entries)


@dataclass
class AdapterDirectory:
    """`badit-serve BASE --adapter-dir DIR`: every adapter-only export in a subdirectory of DIR is known by
    the subdirectory's name and loaded on its first request. Validation (`validate_adapter`: manifest,
    checksums, base fingerprint, geometry) runs once per version of a directory: the result, good or bad,
    is kept with the directory's `file_signature` and reused until a file changes."""

    root: Path
    base_dir: Path
    fingerprint: str
    geometry: SlotGeometry
    _checked: dict[Path, tuple[tuple[tuple[str, int, int], ...], LoadedAdapter | ExportError]] = field(
        default_factory=dict
    )
    validations: int = 0
    """Validations run (a cached result is not counted)."""

    def names(self) -> list[str]:
        """The adapters the directory holds now, sorted (`adapter_names`)."""
        return adapter_names(self.root)

    def path(self, name: str) -> Path | None:
        """DIR/name when `name` is a plain directory name holding an adapter manifest, else None."""
        if not name or name != Path(name).name or name.startswith("."):
            return None
        path = self.root / name
        return path if (path / ADAPTER_INFO_FILE).is_file() else None

    def changed(self, name: str) -> bool:
        """Whether DIR/name differs from the version last validated (vLLM reads an evicted adapter from
        its path again, so a registered adapter's files must stay as they were validated)."""
        path = self.root / name
        cached = self._checked.get(path)
        return cached is not None and cached[0] != file_signature(path)

    def validate(self, name: str) -> LoadedAdapter:
        """The validated adapter DIR/name (cached per directory version); ExportError naming the reason."""
        path = self.path(name)
        if path is None:
            raise ExportError(f"no adapter {name!r} under {self.root}")
        signature = file_signature(path)
        cached = self._checked.get(path)
        if cached is None or cached[0] != signature:
            self.validations += 1
            try:
                result: LoadedAdapter | ExportError = validate_adapter(
                    path, self.base_dir, self.fingerprint, self.geometry
                )
            except ExportError as exc:
                result = exc
            cached = self._checked[path] = (signature, result)
        if isinstance(cached[1], ExportError):
            raise cached[1]
        return cached[1]


def adapter_names(root: Path) -> list[str]:
    """The subdirectories of `root` that hold an adapter manifest, sorted (none if `root` is missing)."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / ADAPTER_INFO_FILE).is_file())


def first_adapter(root: Path, verify_checksums: bool = True) -> LoadedAdapter:
    """The first adapter (by name) under an --adapter-dir that loads: what sets the served geometry when no
    --adapter is given."""
    errors = []
    for name in adapter_names(root):
        try:
            return load_adapter(root / name, verify_checksums=verify_checksums)
        except ExportError as exc:
            errors.append(str(exc))
    raise ExportError(
        f"--adapter-dir {root}: no loadable adapter (an adapter-only export in a subdirectory) to take the "
        f"expert geometry from" + (f"; {errors[0]}" if errors else "")
    )
