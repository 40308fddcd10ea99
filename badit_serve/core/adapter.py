"""Adapter-only Badit directories: the experts, routers and routing table of one run, without the base.

In the BAD delta form (init `bad`, and LoRA-initialised experts) the served base weight is the unmodified
base W, so every adapter trained from the same base shares every base tensor. An adapter directory holds
only what differs:

    badit_adapter.json         `AdapterInfo`: the `badit` block and the base fingerprint
    adapter_config.json        PEFT LoRA config (r = R, lora_alpha = R, target_modules = ['gate_proj']), so
                               that vLLM's LoRA loader reads the directory (see docs/SERVING.md)
    adapter_model.safetensors  per adapted module M (PEFT names, `base_model.model.M.lora_X.weight`):
                               lora_A = [A; router] (K*R + K, d_in), lora_B = B (d_out, K*R), float32
    routing_table.json         as in a full export
    badit_manifest.json        sha256 and size of every other file

The router rows ride in lora_A because vLLM's LoRA loader accepts only lora_A / lora_B tensor names.
The base fingerprint is sha256 over the base's architecture-defining config keys and the float32 bytes
of every adapted base tensor; an adapter is refused on a base whose fingerprint differs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field, ValidationError
from safetensors import safe_open
from safetensors.torch import save_file

from badit_serve.core.export_io import (
    ExportError,
    LoadedExport,
    export_directory,
    read_json,
    verify_manifest,
    write_manifest,
)
from badit_serve.core.format import (
    FORMAT_VERSION,
    ROUTING_TABLE_FILE,
    STRICT,
    WEIGHTS_FILE,
    WEIGHTS_INDEX_FILE,
    BaditBlock,
    RoutingTable,
)
from badit_serve.core.quantized_base import read_quantized_base, recorded_fingerprint

ADAPTER_INFO_FILE = "badit_adapter.json"
PEFT_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
SHAREABLE_INITS = ("bad", "lora")
"""Initialisations whose served residual is the unmodified base weight W (adapter-only export works)."""
FINGERPRINT_CONFIG_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)
SLOTS_CONFIG_KEY = "badit_slots"
"""The hf_config key (set by badit-serve through --hf-overrides) that selects multi-adapter mode."""
LORA_TARGET = "gate_up_proj"
"""The vLLM module that carries an adapted layer's slots (adapters' gate_proj tensors pack into it)."""


class AdapterInfo(BaseModel):
    """badit_adapter.json."""

    model_config = STRICT

    format_version: int = FORMAT_VERSION
    block: BaditBlock
    """The `badit` block of the run, as in a full export's config.json."""
    base_fingerprint: str = Field(pattern=r"^[0-9a-f]{64}$")
    """`base_fingerprint` of the base model the adapter was trained on."""
    base_model: str = ""
    """Name or path of that base model (informational)."""


def peft_name(module: str, which: str) -> str:
    """`model.layers.0.mlp.gate_proj`, "A" -> `base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight`."""
    return f"base_model.model.{module}.lora_{which}.weight"


def base_fingerprint(config: dict[str, Any], adapted: dict[str, torch.Tensor]) -> str:
    """sha256 of the architecture-defining config keys and the float32 bytes of the adapted base tensors
    (module name -> weight), in sorted module order."""
    digest = hashlib.sha256()
    shape = {k: config.get(k) for k in FINGERPRINT_CONFIG_KEYS if config.get(k) is not None}
    digest.update(json.dumps(shape, sort_keys=True).encode())
    for module in sorted(adapted):
        weight = adapted[module].detach().to("cpu", torch.float32).contiguous()  # (d_out, d_in)
        digest.update(f"{module}:{tuple(weight.shape)}".encode())
        digest.update(weight.numpy().tobytes())
    return digest.hexdigest()


def read_base_tensors(base_dir: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The named tensors of a transformers model directory (single file or sharded)."""
    files = [WEIGHTS_FILE]
    if (base_dir / WEIGHTS_INDEX_FILE).is_file():
        weight_map = read_json(base_dir / WEIGHTS_INDEX_FILE).get("weight_map", {})
        missing = [n for n in names if n not in weight_map]
        if missing:
            raise ExportError(f"{base_dir}: base tensor(s) {missing[:3]} not in {WEIGHTS_INDEX_FILE}")
        files = sorted({weight_map[n] for n in names})
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        if not (base_dir / file).is_file():
            raise ExportError(f"{base_dir / file}: missing (the base model's weights)")
        with safe_open(str(base_dir / file), framework="pt") as handle:
            keys = set(handle.keys())
            tensors.update({n: handle.get_tensor(n) for n in names if n in keys})
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ExportError(f"{base_dir}: base tensor(s) {missing[:3]} missing")
    return tensors


def base_dir_fingerprint(
    base_dir: Path, modules: list[str], tensors: dict[str, torch.Tensor] | None = None
) -> str:
    """`base_fingerprint` of a base model directory for the given adapted modules; `tensors`: their
    weights already read with `read_base_tensors` (read here when None). A quantised base answers with
    the full-precision fingerprint it recorded (`quantized_base`)."""
    quantized = read_quantized_base(base_dir)
    if quantized is not None:
        return recorded_fingerprint(base_dir, quantized, modules)
    config = read_json(base_dir / "config.json")
    if tensors is None:
        tensors = read_base_tensors(base_dir, [f"{m}.weight" for m in modules])
    return base_fingerprint(config, {m: tensors[f"{m}.weight"] for m in modules})


def check_shareable(block: BaditBlock) -> None:
    """Refuse methods whose served residual is not the base weight W."""
    if block.init not in SHAREABLE_INITS:
        raise ExportError(
            f"init {block.init!r} (method {block.method!r}) changes the base weight: its residual is "
            f"W - s*B0*A0, not W, so an adapter-only export would need its own base; adapter-only export "
            f"needs init in {list(SHAREABLE_INITS)} (use a full export)"
        )


def _peft_config(block: BaditBlock, base_model: str) -> dict[str, Any]:
    """PEFT's view of the experts: lora_alpha / r = scaling * gate_scale, which vLLM folds into lora_B
    (routed math is linear in both)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": block.rank,
        "lora_alpha": block.rank * block.scaling * block.gate_scale,
        "target_modules": list(block.target_modules),
        "bias": "none",
        "lora_dropout": 0.0,
    }


def adapter_tensors(
    block: BaditBlock, experts: dict[str, dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """PEFT-named tensors from module -> {lora_a, lora_b, router} (see the module docstring)."""
    tensors = {}
    for module in block.adapted_modules:
        parts = experts[module]
        rows = [parts["lora_a"]] + ([parts["router"]] if "router" in parts else [])
        tensors[peft_name(module, "A")] = torch.cat(rows).float().contiguous()  # (K*R + K, d_in)
        tensors[peft_name(module, "B")] = parts["lora_b"].float().contiguous()  # (d_out, K*R)
    return tensors


def write_adapter(
    out_dir: Path,
    *,
    info: AdapterInfo,
    experts: dict[str, dict[str, torch.Tensor]],
    routing_table: RoutingTable,
    force: bool = False,
) -> Path:
    """Write an adapter directory atomically (`export_directory`)."""
    check_shareable(info.block)
    with export_directory(Path(out_dir), force) as staging:
        (staging / ADAPTER_INFO_FILE).write_text(info.model_dump_json(indent=2))
        (staging / PEFT_CONFIG_FILE).write_text(
            json.dumps(_peft_config(info.block, info.base_model), indent=2)
        )
        save_file(adapter_tensors(info.block, experts), str(staging / ADAPTER_WEIGHTS_FILE), {"format": "pt"})
        (staging / ROUTING_TABLE_FILE).write_text(routing_table.model_dump_json(indent=2))
        write_manifest(staging)
    return Path(out_dir)


@dataclass
class LoadedAdapter:
    """A validated adapter directory."""

    path: Path
    info: AdapterInfo
    routing_table: RoutingTable
    experts: dict[str, dict[str, torch.Tensor]]
    """module -> {lora_a (K*R, d_in), lora_b (d_out, K*R)[, router (K, d_in)]}."""

    @property
    def block(self) -> BaditBlock:
        return self.info.block


def _split_experts(
    path: Path, block: BaditBlock, tensors: dict[str, torch.Tensor]
) -> dict[str, dict[str, torch.Tensor]]:
    """PEFT tensors -> module -> {lora_a, lora_b, router}, checking names, shapes and values."""
    n, k = block.num_experts * block.rank, block.num_experts
    router_rows = 0 if block.router == "none" else k
    expected = {peft_name(m, w) for m in block.adapted_modules for w in "AB"}
    if set(tensors) != expected:
        extra, missing = sorted(set(tensors) - expected), sorted(expected - set(tensors))
        raise ExportError(f"{path / ADAPTER_WEIGHTS_FILE}: missing {missing[:3]}, unexpected {extra[:3]}")
    experts: dict[str, dict[str, torch.Tensor]] = {}
    for module in block.adapted_modules:
        a, b = tensors[peft_name(module, "A")], tensors[peft_name(module, "B")]
        if a.dim() != 2 or a.shape[0] != n + router_rows or b.dim() != 2 or b.shape[1] != n:
            raise ExportError(
                f"{path / ADAPTER_WEIGHTS_FILE}: {module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} "
                f"do not match K={k}, R={block.rank} (expected ({n + router_rows}, d_in) and (d_out, {n}))"
            )
        for name, t in ((peft_name(module, "A"), a), (peft_name(module, "B"), b)):
            if not t.is_floating_point() or not torch.isfinite(t).all():
                raise ExportError(f"{path / ADAPTER_WEIGHTS_FILE}: tensor {name!r} is not finite float")
        parts = {"lora_a": a[:n], "lora_b": b}
        if router_rows:
            parts["router"] = a[n:]
        experts[module] = parts
    return experts


def load_adapter(adapter_dir: str | Path, verify_checksums: bool = True) -> LoadedAdapter:
    """Validate and load an adapter directory (manifest, info, routing table, tensor names and shapes)."""
    path = Path(adapter_dir)
    if not path.is_dir():
        raise ExportError(f"{path}: not a directory")
    verify_manifest(path, verify_checksums)
    try:
        info = AdapterInfo.model_validate(read_json(path / ADAPTER_INFO_FILE))
        table = RoutingTable.model_validate(read_json(path / ROUTING_TABLE_FILE))
    except ValidationError as exc:
        raise ExportError(f"{path}: invalid {ADAPTER_INFO_FILE} or {ROUTING_TABLE_FILE}: {exc}") from exc
    if info.format_version != FORMAT_VERSION:
        raise ExportError(
            f"{path / ADAPTER_INFO_FILE}: format_version {info.format_version} is not supported"
        )
    check_shareable(info.block)
    with safe_open(str(path / ADAPTER_WEIGHTS_FILE), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    return LoadedAdapter(path, info, table, _split_experts(path, info.block, tensors))


def check_base(adapter: LoadedAdapter, base_dir: Path, fingerprint: str | None = None) -> None:
    """Raise ExportError unless `base_dir` (or the given fingerprint of it) is the adapter's base."""
    got = fingerprint or base_dir_fingerprint(base_dir, adapter.block.adapted_modules)
    if got != adapter.info.base_fingerprint:
        raise ExportError(
            f"{adapter.path}: trained on a different base model (base fingerprint "
            f"{adapter.info.base_fingerprint[:12]}..., {base_dir} has {got[:12]}...)"
        )


def adapter_from_export(
    export: LoadedExport, base_model: str = ""
) -> tuple[AdapterInfo, dict[str, dict[str, torch.Tensor]]]:
    """(AdapterInfo, experts) of a full export, whose residual weights must be the base weights."""
    check_shareable(export.block)
    adapted = {m: export.tensors[f"{m}.weight"] for m in export.block.adapted_modules}
    info = AdapterInfo(
        block=export.block, base_fingerprint=base_fingerprint(export.config, adapted), base_model=base_model
    )
    return info, {m: export.expert_tensors(m) for m in export.block.adapted_modules}


class SlotGeometry(BaseModel):
    """What every adapter served side by side over one base must share (static shapes), and the number of
    adapter slots. Passed to the vLLM model classes as the `badit_slots` config key (`--hf-overrides`)."""

    model_config = STRICT

    num_experts: int = Field(ge=1)
    rank: int = Field(ge=1)
    top_k: int = Field(ge=1)
    router: str
    target_modules: list[str]
    adapted_modules: list[str]
    max_adapters: int = Field(ge=1)
    """Adapter slots in the engine (vLLM's --max-loras)."""

    @classmethod
    def of(cls, block: BaditBlock, max_adapters: int) -> SlotGeometry:
        return cls(
            num_experts=block.num_experts,
            rank=block.rank,
            top_k=block.top_k,
            router=block.router,
            target_modules=list(block.target_modules),
            adapted_modules=list(block.adapted_modules),
            max_adapters=max_adapters,
        )

    def check_fits(self, adapter: LoadedAdapter) -> None:
        """Raise ExportError naming the first field where `adapter` differs from this geometry."""
        mine = self.model_dump(exclude={"max_adapters"})
        theirs = SlotGeometry.of(adapter.block, self.max_adapters).model_dump(exclude={"max_adapters"})
        for key, value in mine.items():
            if theirs[key] != value:
                raise ExportError(
                    f"{adapter.path}: badit.{key}={theirs[key]!r} does not match the served adapters' "
                    f"{value!r} (adapters served together need the same shapes)"
                )
