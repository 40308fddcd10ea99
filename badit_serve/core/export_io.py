"""Write and validate Badit export directories (see `badit_serve.core.format`).

Writing is atomic: everything goes to a temporary sibling directory that is renamed into place, so an
interrupted export never leaves a half-written OUT_DIR. Reading validates everything and raises
`ExportError` naming the file or tensor at fault.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import safe_open

from badit_serve.core.architectures import BADIT_ARCHITECTURES
from badit_serve.core.atomic import TargetExistsError, atomic_directory, check_target
from badit_serve.core.format import (
    CONFIG_FILE,
    EXPERT_MARK,
    FORMAT_VERSION,
    MANIFEST_FILE,
    ROUTING_TABLE_FILE,
    WEIGHTS_FILE,
    WEIGHTS_INDEX_FILE,
    BaditBlock,
    FileEntry,
    Manifest,
    RoutingTable,
    expert_prefix,
    expert_tensor_shapes,
)
from badit_serve.core.tensor_files import write_tensors

DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3


class ExportError(ValueError):
    """An export directory (or a request to write one) that is invalid; the message names the culprit."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def export_directory(out_dir: Path, force: bool) -> Iterator[Path]:
    """`atomic_directory` for model directories: an existing OUT_DIR without `force` is an `ExportError`."""
    try:
        check_target(out_dir, force)
    except TargetExistsError as exc:
        raise ExportError(str(exc)) from exc
    with atomic_directory(out_dir, force=force) as staging:
        yield staging


def _write_weights(out_dir: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    """One model.safetensors, or shards + index when the total exceeds `max_shard_bytes`."""
    tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if total <= max_shard_bytes:
        write_tensors(out_dir / WEIGHTS_FILE, tensors, metadata={"format": "pt"})
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_tensors(out_dir / file, shard, metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / WEIGHTS_INDEX_FILE).write_text(json.dumps(index, indent=2))


def write_manifest(directory: Path) -> None:
    """badit_manifest.json: sha256 and size of every other file of `directory`."""
    files = {
        p.name: FileEntry(sha256=sha256_file(p), size=p.stat().st_size)
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != MANIFEST_FILE
    }
    (directory / MANIFEST_FILE).write_text(Manifest(files=files).model_dump_json(indent=2))


def write_export(
    out_dir: Path,
    *,
    config: dict[str, Any],
    block: BaditBlock,
    tensors: dict[str, torch.Tensor],
    routing_table: RoutingTable,
    copy_files: list[Path],
    force: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write an export atomically. `config` is the base config dict; `copy_files` are tokenizer and
    generation-config files copied verbatim. An existing `out_dir` is kept unless `force`."""
    out_dir = Path(out_dir)
    if block.base_architecture not in BADIT_ARCHITECTURES:
        raise ExportError(
            f"architecture {block.base_architecture!r} has no Badit class; supported: {sorted(BADIT_ARCHITECTURES)}"
        )
    with export_directory(out_dir, force) as staging:
        full_config = dict(config)
        full_config["architectures"] = [BADIT_ARCHITECTURES[block.base_architecture]]
        full_config["badit"] = block.model_dump(mode="json")
        (staging / CONFIG_FILE).write_text(json.dumps(full_config, indent=2, sort_keys=True))
        _write_weights(staging, tensors, max_shard_bytes)
        for src in copy_files:
            shutil.copy2(src, staging / src.name)
        (staging / ROUTING_TABLE_FILE).write_text(routing_table.model_dump_json(indent=2))
        write_manifest(staging)
    return out_dir


@dataclass
class LoadedExport:
    """A validated export: its config, badit block, routing table and all tensors."""

    path: Path
    config: dict[str, Any]
    block: BaditBlock
    routing_table: RoutingTable
    tensors: dict[str, torch.Tensor]

    def expert_tensors(self, module_name: str) -> dict[str, torch.Tensor]:
        """Suffix (lora_a, lora_b, router) -> tensor for one adapted module."""
        prefix = expert_prefix(module_name)
        shapes = expert_tensor_shapes(self.block, 1, 1)
        return {suffix: self.tensors[f"{prefix}.{suffix}"] for suffix in shapes}

    def base_tensors(self) -> dict[str, torch.Tensor]:
        """Everything except expert tensors (the base weights with residuals in place)."""
        expert_names = {
            f"{expert_prefix(m)}.{s}"
            for m in self.block.adapted_modules
            for s in expert_tensor_shapes(self.block, 1, 1)
        }
        return {k: v for k, v in self.tensors.items() if k not in expert_names}


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ExportError(f"{path}: missing")
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        return data
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path}: not valid JSON: {exc}") from exc


def read_block(export_dir: Path) -> tuple[dict[str, Any], BaditBlock]:
    """config.json and its validated `badit` block (cheap: no weights read)."""
    config = read_json(export_dir / CONFIG_FILE)
    raw = config.get("badit")
    if not isinstance(raw, dict):
        raise ExportError(f"{export_dir / CONFIG_FILE}: no 'badit' block (not a Badit export)")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise ExportError(
            f"{export_dir / CONFIG_FILE}: badit.format_version={version!r} is not supported (this reader knows {FORMAT_VERSION})"
        )
    try:
        block = BaditBlock.model_validate(raw)
    except ValidationError as exc:
        raise ExportError(f"{export_dir / CONFIG_FILE}: invalid badit block: {exc}") from exc
    expected = BADIT_ARCHITECTURES.get(block.base_architecture)
    if expected is None:
        raise ExportError(
            f"{export_dir / CONFIG_FILE}: base architecture {block.base_architecture!r} has no Badit class"
        )
    if config.get("architectures") != [expected]:
        raise ExportError(
            f"{export_dir / CONFIG_FILE}: architectures={config.get('architectures')} but expected [{expected!r}]"
        )
    return config, block


def verify_manifest(export_dir: Path, verify_checksums: bool) -> Manifest:
    try:
        manifest = Manifest.model_validate(read_json(export_dir / MANIFEST_FILE))
    except ValidationError as exc:
        raise ExportError(f"{export_dir / MANIFEST_FILE}: invalid manifest: {exc}") from exc
    for name, entry in manifest.files.items():
        path = export_dir / name
        if not path.is_file():
            raise ExportError(f"{path}: listed in {MANIFEST_FILE} but missing")
        if path.stat().st_size != entry.size:
            raise ExportError(f"{path}: size {path.stat().st_size} != {entry.size} in {MANIFEST_FILE}")
        if verify_checksums and sha256_file(path) != entry.sha256:
            raise ExportError(f"{path}: sha256 mismatch with {MANIFEST_FILE} (corrupted or modified)")
    return manifest


def _read_tensors(export_dir: Path, manifest: Manifest) -> dict[str, torch.Tensor]:
    files = [WEIGHTS_FILE]
    if WEIGHTS_INDEX_FILE in manifest.files:
        index = read_json(export_dir / WEIGHTS_INDEX_FILE)
        files = sorted(set(index.get("weight_map", {}).values()))
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        if file not in manifest.files:
            raise ExportError(f"{export_dir / file}: weights file not listed in {MANIFEST_FILE}")
        with safe_open(str(export_dir / file), framework="pt") as handle:
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name)
    return tensors


def _check_expert_tensors(export_dir: Path, block: BaditBlock, tensors: dict[str, torch.Tensor]) -> None:
    expected_names = set()
    for module in block.adapted_modules:
        weight_name = f"{module}.weight"
        if weight_name not in tensors:
            raise ExportError(f"{export_dir}: residual weight tensor {weight_name!r} missing")
        d_out, d_in = tensors[weight_name].shape
        prefix = expert_prefix(module)
        for suffix, shape in expert_tensor_shapes(block, d_in, d_out).items():
            name = f"{prefix}.{suffix}"
            expected_names.add(name)
            if name not in tensors:
                raise ExportError(f"{export_dir}: expert tensor {name!r} missing")
            tensor = tensors[name]
            if tuple(tensor.shape) != shape:
                raise ExportError(
                    f"{export_dir}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {shape}"
                )
            if not tensor.is_floating_point():
                raise ExportError(
                    f"{export_dir}: tensor {name!r} has dtype {tensor.dtype}, expected a float dtype"
                )
            if not torch.isfinite(tensor).all():
                raise ExportError(f"{export_dir}: tensor {name!r} contains NaN or inf")
    extra = sorted(n for n in tensors if EXPERT_MARK in n and n not in expected_names)
    if extra:
        raise ExportError(
            f"{export_dir}: unexpected expert tensor(s) {extra[:5]} not in badit.adapted_modules"
        )


def load_export(export_dir: str | Path, verify_checksums: bool = True) -> LoadedExport:
    """Validate and load an export: manifest and checksums, config and badit block, routing table,
    and the presence, shape and dtype of every expert tensor (base tensors: see the reference loader)."""
    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise ExportError(f"{export_dir}: not a directory")
    manifest = verify_manifest(export_dir, verify_checksums)
    config, block = read_block(export_dir)
    try:
        table = RoutingTable.model_validate(read_json(export_dir / ROUTING_TABLE_FILE))
    except ValidationError as exc:
        raise ExportError(f"{export_dir / ROUTING_TABLE_FILE}: invalid routing table: {exc}") from exc
    tensors = _read_tensors(export_dir, manifest)
    _check_expert_tensors(export_dir, block, tensors)
    return LoadedExport(export_dir, config, block, table, tensors)
